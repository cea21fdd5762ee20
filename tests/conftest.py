"""Shared test setup.

- Device: MINITRITON_TEST_DEVICE (default "cpu"; "cuda" on a GPU machine). On a CPU the
  Triton kernels run through Triton's interpreter, which must be switched on before triton is
  imported: this file does it first thing.
- Backends: the `backend` fixture runs a test on the Triton kernels and on the torch path.
- Poison: every allocation the library makes with torch.empty / empty_like is filled with NaN
  (floats) or a sentinel (integers), so an element a kernel forgot to write fails loudly.
- Tolerances: one table by dtype (`TOL`, `tol`), used by `assert_close`.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("MINITRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "minitriton", deadline=None, max_examples=12, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large])
settings.load_profile("minitriton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# rtol/atol relative to the scale of the compared vectors (their norms): the dtype's resolution
# for values that are rounded once to the dtype, with room for a few float32 operations.
# (Triton's interpreter truncates float32 -> bfloat16, even when asked to round to nearest,
# where a GPU and torch round: its bfloat16 results can be one ulp further off.)
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Unit roundoff of each dtype (half an ulp of 1): the error of one rounding to it.
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, np.float64)


def assert_close(actual, expected, dtype: torch.dtype, scale=None, what: str = "") -> None:
    """|actual - expected| <= atol * scale + rtol * |expected| elementwise, where scale (default
    1) broadcasts, e.g. per-token norms `[..., 1]`. Prints mismatch count, first indices and
    the max error on failure."""
    a, e = _as_numpy(actual), _as_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    t = TOL[dtype]
    s = 1.0 if scale is None else np.asarray(scale, np.float64)
    bound = t["atol"] * s + t["rtol"] * np.abs(e)
    err = np.abs(a - e)
    bad = ~(err <= bound)                      # NaN counts as bad
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ ({dtype}); first at "
            f"{idx}; max error {np.nanmax(np.where(np.isnan(err), np.inf, err)):.3g}; "
            f"tolerance {t}")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run the test on the Triton kernels (interpreter on a CPU) and on the torch path."""
    monkeypatch.setenv("MINITRITON_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    if DEVICE == "cuda" and not torch.cuda.is_available():   # (a GPU run without a GPU is an
        # error of the run, not a suite of skipped tests that passes)
        pytest.fail("MINITRITON_TEST_DEVICE=cuda but torch sees no CUDA device", pytrace=False)
    return torch.device(DEVICE)


class _PoisonTorch:
    """Stands in for the `torch` module inside library modules: empty allocations are filled."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fill(x):
        if x.is_floating_point():
            x.fill_(float("nan"))
        elif x.dtype != torch.bool:
            x.fill_(-7777 if x.element_size() > 1 else 77)   # (77: a byte, and a set flag)
        return x

    def empty(self, *args, **kwargs):
        return self._fill(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._fill(torch.empty_like(*args, **kwargs))


_LIBRARY_MODULES = ["minitriton.torch_merge", "minitriton.retention",
                    "minitriton.kernels.merge", "minitriton.kernels.restore",
                    "minitriton.kernels.decode", "minitriton.torch_decode", "minitriton.decode",
                    "minitriton._upcast"]


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    for name in _LIBRARY_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "torch"):
            monkeypatch.setattr(mod, "torch", _PoisonTorch())
    yield
