"""Which implementation runs an op: the Triton kernels or the torch path.

    MINITRITON_BACKEND=auto    (default) CUDA tensors -> Triton kernels, CPU tensors -> torch path
    MINITRITON_BACKEND=triton  always the Triton kernels; CPU tensors need TRITON_INTERPRET=1
                               (Triton's interpreter: how the kernels are tested without a GPU)
    MINITRITON_BACKEND=torch   always the torch path (vectorised torch ops, any device)

The variable is read at every call, so tests and users can switch without re-importing.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is on (kernels run on CPU tensors, through numpy), read
    from TRITON_INTERPRET as Triton itself reads it: through its knobs from triton 3.4 (1, true,
    yes, on), as "1" before."""
    knobs = _triton_knobs()
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_knobs():
    """triton.knobs (3.4 on), or None: looked up once, not at every call."""
    try:
        from triton import knobs
        knobs.runtime.interpret
    except (ImportError, AttributeError):
        return None
    return knobs


def requested_backend() -> str:
    name = os.environ.get("MINITRITON_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"MINITRITON_BACKEND: expected one of {BACKENDS}, got {name!r}")
    return name


def select_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, following MINITRITON_BACKEND."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"MINITRITON_BACKEND='triton' with tensors on device {device}: the Triton kernels "
            "need CUDA tensors, or TRITON_INTERPRET=1 (set before importing triton) to run them "
            "on CPU tensors through Triton's interpreter")
    return "triton"


def on_device(device: torch.device):
    """The context in which to launch kernels on tensors of `device`: Triton launches on the
    current CUDA device and its current stream, not on the tensors' device, so a CUDA device
    other than the current one (a model spread over several GPUs) is made current for the
    launch; nothing to do elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
