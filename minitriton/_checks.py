"""Argument checks shared by the public ops. Each raises TypeError or ValueError naming the
argument and the offending value, before any kernel runs."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_tensor(name: str, x, ndim: int | None = None, dtypes=SUPPORTED_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (expected one of {names})")
    return x


def plain(x):
    """x seen as a plain torch.Tensor (a view, no copy) when it is of a subclass, so that every
    output, on every backend, is a plain tensor (None stays None)."""
    return x if x is None or type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def check_dense(name: str, x: torch.Tensor) -> None:
    """A dense (strided) tensor: not sparse, mkldnn or nested."""
    if x.is_nested:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")


PADDING = "1 for a token and 0 for padding"


def check_mask_dtype(name: str, mask: torch.Tensor, meaning: str = PADDING) -> None:
    """A token mask's dtype: bool or an integer one (`meaning` says what 1 and 0 are)."""
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name}: dtype {mask.dtype} is not supported (expected bool or an "
                        f"integer dtype, {meaning})")


def token_mask(name: str, mask: torch.Tensor, meaning: str = PADDING) -> torch.Tensor:
    """A token mask (dtype checked) as bool: the tensor itself when it is bool, else
    `mask != 0`. Integer values other than 0 and 1 are refused on a CPU (on CUDA, where
    checking would synchronise, nonzero counts as 1)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.device.type == "cpu" and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            at = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"{name}: expected {meaning}, got {mask[at].item()!r} at {at}")
    return mask != 0


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor,
               shape: bool = True) -> None:
    """x must match ref in dtype and device (and shape, unless shape=False)."""
    if shape and x.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match {ref_name}'s "
                         f"{tuple(ref.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match {ref_name}'s {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: device {x.device} does not match {ref_name}'s {ref.device}")


def check_has_data(name: str, x: torch.Tensor) -> None:
    """Not on the meta device (shapes only: nothing to compute with). Checked after the
    device agreement checks, so that a meta tensor next to a real one reports the mismatch."""
    if x.device.type == "meta":
        raise ValueError(f"{name}: a tensor on the meta device holds no data to compute with")


def check_head_dim(name: str, D: int) -> None:
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim D={D} is outside the supported "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def check_real(name: str, v, what: str = "a float") -> float:
    """A real number (Python, numpy, or a one-element tensor or array; not a bool), returned as
    float."""
    if isinstance(v, np.ndarray):
        if v.size != 1 or v.dtype.kind not in "iuf":
            raise TypeError(f"{name}: expected {what}, got a {v.dtype} array of shape {v.shape}")
        v = v.item()
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name}: expected {what}, got a {v.dtype} tensor of shape "
                            f"{tuple(v.shape)}")
        check_has_data(name, v)
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__} {v!r}")
    try:
        return float(v)
    except OverflowError:   # e.g. an int or Fraction beyond float's range
        text = str(v)
        raise ValueError(f"{name}: expected {what}, got {type(v).__name__} "
                         f"{text if len(text) <= 40 else text[:37] + '...'} (beyond float's "
                         f"range)") from None


def check_unit_interval(name: str, v) -> float:
    """A real number in [0, 1] (not NaN), returned as float."""
    v = check_real(name, v, "a float in [0, 1]")
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {v!r}")
    return v


def check_int(name: str, v, what: str = "an int") -> int:
    """An integer (Python or numpy; not a bool), returned as int."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected {what}, got {type(v).__name__} {v!r}")
    return int(v)


def check_bool(name: str, v) -> bool:
    """A bool (Python or numpy), returned as bool."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")
    return bool(v)


def check_index(name: str, v, what: str = "an int", low: int = 0) -> int:
    """An integer >= low (Python or numpy; not a bool), returned as int."""
    v = check_int(name, v, f"{what} >= {low}")
    if v < low:
        raise ValueError(f"{name}: expected {what} >= {low}, got {v!r}")
    return int(v)
