"""Pieces shared by the kernels: device math the interpreter can run, and config helpers."""

from __future__ import annotations

import triton
import triton.language as tl

from ..backend import interpreter_enabled

PI = 3.141592653589793


@triton.jit
def atan2_nonneg(y, x):
    """atan2(y, x) for y, x >= 0, in [0, pi/2]; 0 when both are 0.

    Triton's core language has no inverse trigonometry and libdevice does not run in the
    interpreter, so this is the Cephes single-precision atan (a few ulp) on the reduced argument
    min / max in [0, 1]."""
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    a = tl.where(mx > 0, mn / tl.where(mx > 0, mx, 1.0), 0.0)
    big = a > 0.41421356237309503                     # tan(pi / 8)
    z = tl.where(big, (a - 1.0) / (a + 1.0), a)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
         - 3.33329491539e-1) * z2 * z + z
    r = tl.where(big, 0.7853981633974483 + p, p)
    return tl.where(y > x, 1.5707963267948966 - r, r)


def block_d(D: int) -> int:
    """The power-of-two tile width that covers a head dim D (the tail is masked)."""
    return max(16, triton.next_power_of_2(D))


def pick_configs(full: list, interpreted: triton.Config) -> list:
    """Autotune configs: the full list on a GPU, a single one under the interpreter (which
    cannot benchmark: it has no active driver)."""
    return [interpreted] if interpreter_enabled() else full


def torch_to_tl_dtype(dtype) -> str:
    import torch
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
            torch.int32: "i32", torch.int64: "i64"}[dtype]
