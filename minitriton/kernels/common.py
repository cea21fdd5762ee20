"""Pieces shared by the kernels: device math the interpreter can run, and config helpers."""

from __future__ import annotations

import os

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


def pick_configs(full: list, single: triton.Config) -> list:
    """Autotune configs: the full list on a GPU; a single one under the interpreter (which
    cannot benchmark: it has no active driver) or with MINITRITON_AUTOTUNE=0 (read at import;
    e.g. for test runs on a GPU, where autotuning every drawn shape costs minutes)."""
    if interpreter_enabled() or os.environ.get("MINITRITON_AUTOTUNE", "1") == "0":
        return [single]
    return full


def token_tile_configs() -> list:
    """The GPU autotune space of the kernels that tile [BLOCK_S tokens, BLOCK_D] (merge pass 1,
    restore); each kernel prunes it to what fits its registers (`tile_pruner`)."""
    return [triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=1)
            for bs in (8, 16, 32) for w in (4, 8)]


def token_tile_autotune_configs() -> list:
    """`token_tile_configs()`, or one config under the interpreter."""
    return pick_configs(token_tile_configs(),
                        triton.Config({"BLOCK_S": 16}, num_warps=4, num_stages=1))


def tile_pruner(elems_per_thread: int):
    """An `early_config_prune` keeping the configs whose [BLOCK_S, BLOCK_D] tile puts at most
    `elems_per_thread` elements in each thread (32 threads a warp)."""
    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        kept = [c for c in configs
                if c.kwargs["BLOCK_S"] * bd <= 32 * elems_per_thread * c.num_warps]
        return kept or configs[:1]
    return prune


# CUDA grid axes y and z take at most 65535 programs (x: 2^31 - 1).
GRID_YZ_MAX = 65535


def batch_chunks(B: int, H: int):
    """Batch slices for launches on a (tiles, H, B) grid: H must fit axis y, and B is cut into
    chunks that fit axis z (one chunk for any realistic batch)."""
    if H > GRID_YZ_MAX:
        raise ValueError(f"H={H} heads: at most {GRID_YZ_MAX} (a CUDA grid axis) are supported")
    return [slice(b, min(B, b + GRID_YZ_MAX)) for b in range(0, B, GRID_YZ_MAX)]


def torch_to_tl_dtype(dtype) -> str:
    import torch
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
            torch.int32: "i32", torch.int64: "i64"}[dtype]
