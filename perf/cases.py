"""The points of each op's sweep and what is measured at each one.

A `Point` is one shape and dtype. `build(point, device)` makes its inputs and returns a `Case`:
the op and its baselines as `Provider`s, each with the bytes it must move at least, so that
GB/s and "% of copy bandwidth" mean the same thing for every op.

Minimum traffic (bytes), with E the element size and N the number of retained token pairs:

    merge    read x_prev, x_cur (2 BHSD E); write the MergedPair: e (BHSD E), mag_prev and
             mag_cur (2 x 4 BHS), slot (4 BHS), the retained store (2 N D E), d_min/d_max (8 BH)
    restore  read e, mag_prev, mag_cur, slot and the retained store; write both layers (2 BHSD E)
    decode   read, for keys and values, the layer's part of the pair: e, its magnitude, slot and
             its retained originals; read q and the tail (2 BHTD E); write o (B Hq D E)

Baselines, measured in the same run at every point:

    copy          a device-to-device copy that moves the op's bytes (reads half, writes half):
                  the bandwidth ceiling, and the op's time cannot be below it
    torch         the same op through the torch path (MINITRITON_BACKEND=torch); only where the
                  op itself runs the Triton kernels
    sdpa          decode: torch's scaled_dot_product_attention over the uncompressed layer
    flash         decode: flash-attn's flash_attn_with_kvcache over it, where flash-attn imports
    restore+sdpa  decode: restore both pairs, then sdpa over the restored layer
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

OPS = ("merge", "restore", "decode")
GRIDS = ("quick", "check", "full")
PUBLIC_NAMES = {"merge": ("merge",), "restore": ("merge", "restore"),
                "decode": ("merge", "decode_attention", "restore")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
T_MERGE, GAMMA = 0.6, 0.05


@dataclass(frozen=True)
class Point:
    """One shape and dtype of an op. Hq (query heads) and T (tail tokens) are decode's."""

    op: str
    dtype: torch.dtype
    B: int
    H: int
    S: int
    D: int
    Hq: int = 0
    T: int = 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        if self.op == "decode":
            tail = f" T={self.T}" if self.T else ""
            return f"B={self.B} Hq={self.Hq} H={self.H} S={self.S} D={self.D}{tail}"
        return f"[{self.B},{self.H},{self.S},{self.D}]"


@dataclass
class Provider:
    """One implementation measured at a point. `make()` allocates what the call needs and
    returns the callable to time, so large buffers live only while they are measured."""

    name: str
    make: Callable[[], Callable[[], object]]
    bytes: int
    env: dict = field(default_factory=dict)


@dataclass
class Case:
    point: Point
    providers: list          # the op first, then its baselines
    flops: int
    in_bytes: int            # the op's inputs (merge: both layers; the x axis of "inputs >= 64 MB")
    compressed_bytes: int    # the MergedPair(s) the point works on
    dense_bytes: int         # the same layers uncompressed
    notes: list = field(default_factory=list)   # baselines not measured, and why
    inputs: tuple = ()       # merge: (x_prev, x_cur), for baselines over the same tensors


# ---- grids ----------------------------------------------------------------------------------
def grid(op: str, name: str) -> list[Point]:
    """The points of `op` in grid `name`: "quick" (tiny, for a CPU and CI), "check" (the key
    points of perf/gpu_check.sh) or "full"."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if name not in GRIDS:
        raise ValueError(f"grid: expected one of {GRIDS}, got {name!r}")
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    if op in ("merge", "restore"):
        if name == "quick":
            shapes = [(f32, 1, 2, 64, 64), (f32, 2, 4, 256, 64), (bf16, 2, 4, 128, 128)]
        elif name == "check":
            # Inputs of 64 MiB and 512 MiB in bf16/fp16, twice that in fp32 (B=4, H=8, D=128).
            dts = (bf16, f16, f32) if op == "merge" else (bf16,)
            shapes = [(dt, 4, 8, s, 128) for dt in dts for s in (4096, 32768)]
        else:
            shapes = [(dt, 4, 8, s, 128) for dt in (bf16, f16, f32)
                      for s in (64, 256, 1024, 4096, 16384, 65536)]
            shapes += [(dt, 4, 8, 16384, d) for dt in (bf16, f32) for d in (64, 256)]
        return [Point(op, dt, b, h, s, d) for dt, b, h, s, d in shapes]
    if name == "quick":
        return [Point(op, f32, 1, 2, 64, 32, Hq=4), Point(op, f32, 2, 2, 256, 64, Hq=8, T=8),
                Point(op, bf16, 1, 2, 128, 64, Hq=4)]
    key = [Point(op, bf16, b, 8, s, 128, Hq=32) for b in (1, 8, 32)
           for s in (1024, 8192, 32768, 131072)]
    if name == "check":
        return key
    return key + [Point(op, dt, 8, 8, s, 128, Hq=32) for dt in (f16, f32)
                  for s in (1024, 8192, 32768)] + [Point(op, bf16, 8, 8, 8192, 128, Hq=32, T=64)]


# ---- availability ---------------------------------------------------------------------------
def missing(op: str) -> str | None:
    """None when minitriton provides what `op`'s points need, else why not."""
    try:
        mt = importlib.import_module("minitriton")
    except Exception as exc:  # any import failure means the op cannot be measured
        return f"import minitriton failed ({type(exc).__name__}: {exc})"
    absent = [n for n in PUBLIC_NAMES[op] if not callable(getattr(mt, n, None))]
    if absent:
        return "minitriton does not provide " + ", ".join(absent)
    return None


def op_backend(device: torch.device) -> str:
    """Which implementation the public op runs on `device` (MINITRITON_BACKEND, as in
    minitriton.backend): "triton" or "torch"."""
    name = os.environ.get("MINITRITON_BACKEND", "auto").strip().lower() or "auto"
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return "torch"
    return "triton"


# ---- inputs ---------------------------------------------------------------------------------
def _layers(shape, dtype, device, gen):
    """Two adjacent layers' states: correlated (cos ~ 0.6), as in a real model's deep layers,
    so that retention keeps a few tokens and not half of them."""
    x_prev = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    x_cur = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    x_cur.mul_(0.8).add_(x_prev, alpha=0.6)
    return x_prev, x_cur


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _restore_bytes(m, layers=("prev", "cur")) -> int:
    """restore's minimum traffic for `layers`: read e, the slot map and each layer's magnitudes
    and retained originals (not d_min/d_max), write each layer."""
    parts = {"prev": (m.mag_prev, m.kept_prev), "cur": (m.mag_cur, m.kept_cur)}
    return (_nbytes(m.e, m.slot, *(x for layer in layers for x in parts[layer]))
            + len(layers) * m.e.numel() * m.e.element_size())


def _copy_provider(nbytes: int, device) -> Provider:
    half = max(1, nbytes // 2)

    def make():
        src = torch.ones(half, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return Provider("copy", make, 2 * half)


def _op_torch_copy(make_op, nbytes: int, device) -> tuple[list, list]:
    """(providers, notes): the op, the same op on the torch path where the op itself runs the
    Triton kernels, and the copy of its bytes."""
    providers, notes = [Provider("op", make_op, nbytes)], []
    if op_backend(device) == "triton":
        providers.append(Provider("torch", make_op, nbytes, env={"MINITRITON_BACKEND": "torch"}))
    else:
        notes.append("torch: the op itself runs the torch path on this device")
    providers.append(_copy_provider(nbytes, device))
    return providers, notes


# ---- cases ----------------------------------------------------------------------------------
def build(p: Point, device: torch.device, seed: int = 0) -> Case:
    """Inputs and providers of point `p` on `device`."""
    import minitriton as mt

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if p.op == "merge":
        x_prev, x_cur = _layers((p.B, p.H, p.S, p.D), p.dtype, device, gen)
        m = mt.merge(x_prev, x_cur, T_MERGE, GAMMA)
        nbytes = m.dense_nbytes + m.nbytes   # both inputs read, the whole pair written

        def make():
            return lambda: mt.merge(x_prev, x_cur, T_MERGE, GAMMA)
        providers, notes = _op_torch_copy(make, nbytes, device)
        flops = p.B * p.H * p.S * (9 * p.D + 40)
        return Case(p, providers, flops, m.dense_nbytes, m.nbytes, m.dense_nbytes, notes,
                    inputs=(x_prev, x_cur))
    if p.op == "restore":
        m = mt.merge(*_layers((p.B, p.H, p.S, p.D), p.dtype, device, gen), T_MERGE, GAMMA)
        nbytes = _restore_bytes(m)

        def make():
            return lambda: mt.restore(m)
        providers, notes = _op_torch_copy(make, nbytes, device)
        return Case(p, providers, 2 * p.B * p.H * p.S * p.D, m.nbytes, m.nbytes, m.dense_nbytes,
                    notes)
    return _build_decode(p, device, gen, mt)


def _build_decode(p: Point, device, gen, mt) -> Case:
    B, H, S, D, Hq, T = p.B, p.H, p.S, p.D, p.Hq, p.T
    G = Hq // H
    pairs, dense_kv = [], []
    for _ in range(2):  # keys, then values; the "prev" layer is dropped once merged
        x_prev, x_cur = _layers((B, H, S, D), p.dtype, device, gen)
        pairs.append(mt.merge(x_prev, x_cur, T_MERGE, GAMMA))
        del x_prev
        dense_kv.append(x_cur)
    kp, vp = pairs
    q = torch.randn((B, Hq, D), generator=gen, device=device, dtype=p.dtype)
    tails = [torch.randn((B, H, T, D), generator=gen, device=device, dtype=p.dtype)
             if T else None for _ in range(2)]
    if T:  # the uncompressed layer holds the tail too, already in place
        dense_kv = [torch.cat([x, t], dim=2) for x, t in zip(dense_kv, tails)]
    kd, vd = dense_kv
    io = _nbytes(q) * 2 + _nbytes(*tails)   # q in, o out, tail in
    layer_bytes = sum(_nbytes(m.e, m.mag_cur, m.slot, m.kept_cur) for m in pairs)
    sdpa_bytes = _nbytes(kd, vd) + _nbytes(q) * 2
    # Query head hq uses KV head hq // G: viewing q as [B, H, G, D] lets SDPA read each KV head
    # once for its G queries, with no repeat of the cache.
    q4 = q.view(B, H, G, D)

    def make_op():
        return lambda: mt.decode_attention(q, kp, vp, layer="cur", k_tail=tails[0],
                                           v_tail=tails[1])

    def make_sdpa():
        return lambda: F.scaled_dot_product_attention(q4, kd, vd)

    def make_restore_sdpa():
        def run():
            k_cur, v_cur = mt.restore(kp, layer="cur"), mt.restore(vp, layer="cur")
            if T:
                k_cur, v_cur = torch.cat([k_cur, tails[0]], 2), torch.cat([v_cur, tails[1]], 2)
            return F.scaled_dot_product_attention(q4, k_cur, v_cur)
        return run

    op_bytes = layer_bytes + io
    restore_bytes = sum(_restore_bytes(m, ("cur",)) for m in pairs)
    providers, notes = _op_torch_copy(make_op, op_bytes, device)
    providers.append(Provider("sdpa", make_sdpa, sdpa_bytes))
    flash = _flash_provider(q, kd, vd, sdpa_bytes)
    if isinstance(flash, Provider):
        providers.append(flash)
    else:
        notes.append(flash)
    providers.append(Provider("restore+sdpa", make_restore_sdpa, restore_bytes + sdpa_bytes))
    flops = 4 * B * Hq * (S + T) * D
    return Case(p, providers, flops, layer_bytes, kp.nbytes + vp.nbytes,
                kp.dense_nbytes + vp.dense_nbytes, notes)


def _flash_provider(q, kd, vd, nbytes):
    """flash-attn over the uncompressed layer, or the reason it is not measured."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return "flash: needs CUDA and float16/bfloat16"
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as exc:  # not installed, or built for another torch
        return f"flash: flash_attn does not import ({type(exc).__name__})"

    def make():
        # flash-attn wants [B, S, H, D]; the conversion is setup, not part of the timed call.
        kc, vc = kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous()
        q1 = q.unsqueeze(1)
        return lambda: flash_attn_with_kvcache(q1, kc, vc)
    return Provider("flash", make, nbytes)


def compute_roof_flops(dtype: torch.dtype, device: torch.device, n: int, bench) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype`: the compute roof of the roofline."""
    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    ms = bench(lambda: a @ b).median_ms
    return 2 * n ** 3 / (ms * 1e-3)


def describe(p: Point) -> dict:
    """The point's columns in the results."""
    return {"op": p.op, "dtype": p.dtype_name, "B": p.B, "H": p.H, "Hq": p.Hq or "",
            "S": p.S, "D": p.D, "T": p.T if p.op == "decode" else "", "shape": p.label}


def gib(nbytes: float) -> str:
    """Human-readable bytes: 1.5 KiB, 64.0 MiB, 2.0 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"

