"""Pieces shared by the kernels: device math the interpreter can run, and config helpers."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..backend import interpreter_enabled

PI = 3.141592653589793


@triton.jit
def atan2_nonneg(y, x):
    """atan2(y, x) for y, x >= 0, in [0, pi/2]; 0 when both are 0, NaN when both are NaN.

    Triton's core language has no inverse trigonometry and libdevice does not run in the
    interpreter, so this is the Cephes single-precision atan (a few ulp) on the reduced argument
    min / max in [0, 1]."""
    mx = tl.maximum(x, y)
    mn = tl.minimum(x, y)
    a = tl.where(mx == 0, 0.0, mn / tl.where(mx == 0, 1.0, mx))      # (NaN stays NaN)
    big = a > 0.41421356237309503                     # tan(pi / 8)
    z = tl.where(big, (a - 1.0) / (a + 1.0), a)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2
         - 3.33329491539e-1) * z2 * z + z
    r = tl.where(big, 0.7853981633974483 + p, p)
    return tl.where(y > x, 1.5707963267948966 - r, r)


@triton.jit
def saturate(x, OUT_MAX: tl.constexpr):
    """x clamped to [-OUT_MAX, OUT_MAX] (NaN stays NaN, inf saturates), or x itself when
    OUT_MAX is 0: a float32 result stored as float16 or bfloat16 stays finite (see `out_max`)."""
    if OUT_MAX > 0:
        x = tl.clamp(x, -OUT_MAX, OUT_MAX, propagate_nan=tl.PropagateNan.ALL)
    return x


def out_max(dtype) -> float:
    """`saturate`'s bound for results stored in `dtype` (a torch dtype or "fp16"/"bf16"/
    "fp32"): the largest finite float16 / bfloat16, 0 (no clamp) for float32."""
    import torch
    name = dtype if isinstance(dtype, str) else torch_to_tl_dtype(dtype)
    return {"fp16": float(torch.finfo(torch.float16).max),
            "bf16": float(torch.finfo(torch.bfloat16).max)}.get(name, 0.0)


def version(text: str) -> tuple:
    """(major, minor) of a version string such as "3.10.0+git1234"."""
    return tuple(int(p) for p in text.split(".")[:2])


def block_d(D: int) -> int:
    """The power-of-two tile width that covers a head dim D (the tail is masked)."""
    return max(16, triton.next_power_of_2(D))


def pick_configs(full: list, single: triton.Config) -> list:
    """Autotune configs: the full list on a GPU; a single one under the interpreter (which
    cannot benchmark: it has no active driver) or with MINITRITON_AUTOTUNE=0 (read when the
    kernels are built, at the first Triton call; e.g. for test runs on a GPU, where
    autotuning every drawn shape costs minutes)."""
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


def token_tile_autotune(kernel, prune, restore_value=()):
    """`kernel` autotuned over `token_tile_autotune_configs()`, keyed on D and BLOCK_D, pruned by
    `prune`; launched as `tuned[grid](...)`.

    restore_value: the arguments the kernel accumulates into (atomics) rather than overwrites.
    Tuning runs every config on the caller's tensors before the chosen one runs; these are
    saved before each of those runs and put back after it, so that the call's result holds
    the chosen config's run alone, as every later call's does.

    The benchmarker is looked up at the first tuning (as triton >= 3.4 does by default):
    triton 3.2-3.3 look it up when the autotuner is built, which fails on a machine without a
    GPU (the ahead-of-time compile check), and 3.2's decorator drops `do_bench`; hence the
    Autotuner itself, whose arguments are the same from 3.2 to 3.9. A single config (the
    interpreter, MINITRITON_AUTOTUNE=0) is launched directly: there is nothing to tune, and
    triton 3.2's interpreter rejects the autotuner's launch options."""
    for name in restore_value:
        if name not in kernel.arg_names:
            raise ValueError(f"restore_value: {name!r} is not an argument of {kernel.fn.__name__}")
    configs = token_tile_autotune_configs()
    if len(configs) == 1:   # (on a GPU: the first config `prune` keeps for the launch's BLOCK_D)
        return _OneConfig(kernel, configs[0], restore_value,
                          None if interpreter_enabled() else prune)
    from triton.runtime.autotuner import Autotuner

    return Autotuner(kernel, kernel.arg_names, configs, ["D", "BLOCK_D"],
                     reset_to_zero=None, restore_value=list(restore_value) or None,
                     prune_configs_by={"early_config_prune": prune}, do_bench=_benchmark)


class _OneConfig:
    """`kernel[grid](...)` with the meta-parameters, warps and stages of one config (nothing
    to tune, so `restore_value` is only recorded): `config`, or, given `prune`, the first of
    `token_tile_configs()` that it keeps for the launch's BLOCK_D (MINITRITON_AUTOTUNE=0 on a
    GPU: a config that fits the registers at every head dim, one of those the compile check
    covers)."""

    def __init__(self, kernel, config, restore_value=(), prune=None):
        self.kernel, self.config, self.restore_value = kernel, config, tuple(restore_value)
        self.prune = prune
        self._by_block_d: dict = {}   # BLOCK_D -> the config `prune` keeps first (chosen once)

    def _config(self, block_d):
        if self.prune is None:
            return self.config
        if block_d not in self._by_block_d:
            self._by_block_d[block_d] = self.prune(token_tile_configs(), {},
                                                   BLOCK_D=block_d)[0]
        return self._by_block_d[block_d]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            c = self._config(kwargs["BLOCK_D"])
            return self.kernel[grid](*args, **kwargs, **c.kwargs, num_warps=c.num_warps,
                                     num_stages=c.num_stages)
        return launch


def _benchmark(kernel_call, quantiles):
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


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
