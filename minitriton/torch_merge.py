"""The torch path of merge and restore: the same contract as the Triton kernels, in vectorised
torch ops, for CPU tensors (and any device with MINITRITON_BACKEND=torch).

Merge costs, per token, the reads of both inputs for the two norms and the dot product and one
fused pass that writes e; everything else is per-token scalar work on `[B, H, S]`:

    |e|^2 = w_p^2 + w_c^2 + 2 w_p w_c cos(Omega)     (no pass over e to renormalise it)
    x_prev . e = a |x_prev|^2 + b (x_prev . x_cur)     (projection magnitudes without a pass)

The work is done in chunks of tokens small enough to stay in the CPU's cache, so the inputs
stream from memory about once.
"""

from __future__ import annotations

import math

import torch

from .pair import MergedPair, _slots_from_mask
from .reference import LERP_EPS, SIN_EPS

# Bytes of float32 input per chunk (both layers): large enough that per-op overhead stays small,
# small enough that the passes over one chunk hit the cache.
_CHUNK_BYTES = 8 << 20


def _slerp_coefficients(n_p, n_c, dot, t: float):
    """Per-token scalars (a, b, d) such that e = a x_prev + b x_cur is the unit SLERP direction
    and d = Omega / pi. All inputs and outputs float32 `[...]`."""
    zero_p, zero_c = n_p == 0, n_c == 0
    inv_p = torch.where(zero_p, torch.zeros_like(n_p), 1.0 / n_p)
    inv_c = torch.where(zero_c, torch.zeros_like(n_c), 1.0 / n_c)
    cos = (dot * inv_p * inv_c).clamp_(-1.0, 1.0)       # 0 when either vector is zero
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() >= SIN_EPS
    sin_ = torch.where(safe, sin, torch.ones_like(sin))
    w_p = torch.where(safe, torch.sin((1.0 - t) * omega) / sin_, torch.full_like(sin, 1.0 - t))
    w_c = torch.where(safe, torch.sin(t * omega) / sin_, torch.full_like(sin, t))
    # Only non-zero directions contribute to |e|.
    w_p = torch.where(zero_p, torch.zeros_like(w_p), w_p)
    w_c = torch.where(zero_c, torch.zeros_like(w_c), w_c)
    n_e = torch.sqrt((w_p * w_p + w_c * w_c + 2.0 * w_p * w_c * cos).clamp_(min=0.0))
    degenerate = (~safe) & (n_e < LERP_EPS)               # antiparallel at t = 0.5: take u_c
    w_p = torch.where(degenerate, torch.zeros_like(w_p), w_p)
    w_c = torch.where(degenerate, torch.ones_like(w_c), w_c)
    n_e = torch.where(degenerate, (~zero_c).to(n_e.dtype), n_e)
    inv_e = torch.where(n_e > 0, 1.0 / n_e, torch.zeros_like(n_e))
    return w_p * inv_p * inv_e, w_c * inv_c * inv_e, omega * (1.0 / math.pi)


def _merge_chunk(xp, xc, e_out, t: float, magnitude: str):
    """Merge one chunk of tokens `[B, H, s, D]`; writes e into `e_out` and returns
    (mag_p, mag_c, d), float32 `[B, H, s]`."""
    xp32, xc32 = xp.float(), xc.float()
    n_p = torch.linalg.vector_norm(xp32, dim=-1)
    n_c = torch.linalg.vector_norm(xc32, dim=-1)
    dot = torch.linalg.vecdot(xp32, xc32)
    a, b, d = _slerp_coefficients(n_p, n_c, dot, t)
    e32 = torch.mul(xp32, a.unsqueeze(-1))
    e32.addcmul_(xc32, b.unsqueeze(-1))
    e_out.copy_(e32)
    if magnitude == "norm":
        return n_p, n_c, d
    # x . e with e = a x_prev + b x_cur, evaluated on the float32 e (before the dtype cast).
    return a * n_p * n_p + b * dot, a * dot + b * n_c * n_c, d


def merge_torch(x_prev: torch.Tensor, x_cur: torch.Tensor, t: float, gamma: float,
                magnitude: str, d_range=None) -> MergedPair:
    """See `minitriton.merge` (arguments already validated)."""
    B, H, S, D = x_prev.shape
    dev = x_prev.device
    e = torch.empty((B, H, S, D), dtype=x_prev.dtype, device=dev)
    mag_p = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    mag_c = torch.empty_like(mag_p)
    d = torch.empty_like(mag_p)
    step = S if dev.type != "cpu" else max(1, _CHUNK_BYTES // max(1, 8 * D * B * H))
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        mp, mc, dd = _merge_chunk(x_prev[:, :, s0:s1], x_cur[:, :, s0:s1], e[:, :, s0:s1],
                                  t, magnitude)
        mag_p[:, :, s0:s1], mag_c[:, :, s0:s1], d[:, :, s0:s1] = mp, mc, dd
    d_min, d_max = d.amin(dim=-1), d.amax(dim=-1)
    return finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                        d_range, gather=gather_retained_torch)


def retention_threshold(d_min: torch.Tensor, d_max: torch.Tensor, gamma: float) -> torch.Tensor:
    """float32 `[B, H]`: a token is retained iff d > threshold (SPEC: strict).

    d_max - (d_max - d_min) * gamma is non-increasing in gamma in floating point (each operation
    rounds monotonically); clamping at d_min and pinning gamma = 1 to d_min exactly make
    gamma = 1 retain all but the least distant token despite rounding.
    """
    if gamma >= 1.0:
        return d_min.clone()
    thr = d_max - (d_max - d_min) * gamma
    return torch.maximum(thr, d_min)


def gather_retained_torch(x_prev, x_cur, retained):
    """The retained tokens' originals, `[N, D]` each, rows in (b, h, s) order."""
    return x_prev[retained], x_cur[retained]


def finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                 d_range, gather) -> MergedPair:
    """Shared by both backends: retention from d and the row extremes, then the retained store.

    The store is compact, so its size N is read on the host (one synchronisation)."""
    if d_range is not None:
        d_min = torch.minimum(d_min, d_range[0].to(d_min))
        d_max = torch.maximum(d_max, d_range[1].to(d_max))
    thr = retention_threshold(d_min, d_max, gamma)
    retained = d > thr.unsqueeze(-1)
    slot = _slots_from_mask(retained)
    kept_prev, kept_cur = gather(x_prev, x_cur, retained)
    return MergedPair(e, mag_p, mag_c, slot, kept_prev, kept_cur, d_min, d_max,
                      float(t), float(gamma), magnitude)


def restore_torch(m: MergedPair) -> tuple[torch.Tensor, torch.Tensor]:
    """See `minitriton.restore`."""
    e32 = m.e.float()
    outs = []
    for mag, kept in ((m.mag_prev, m.kept_prev), (m.mag_cur, m.kept_cur)):
        x = (e32 * mag.unsqueeze(-1)).to(m.dtype)
        if kept.shape[0]:
            x[m.retained] = kept
        outs.append(x)
    return outs[0], outs[1]
