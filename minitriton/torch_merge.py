"""The torch path of merge and restore: the same contract as the Triton kernels, in vectorised
torch ops, for CPU tensors (and any device with MINITRITON_BACKEND=torch).

Merge makes two passes over the inputs, chunk by chunk: the per-token reductions (two norms and
the dot product), then e = a x_prev + b x_cur; in between, the per-token scalar work runs once
over `[B, H, S]`. Two identities avoid further passes:

    |e|^2 = w_p^2 + w_c^2 + 2 w_p w_c cos(Omega)     (no pass over e to renormalise it)
    x_prev . e = a |x_prev|^2 + b (x_prev . x_cur)     (projection magnitudes without a pass)

Chunks of tokens keep the temporaries (float32 copies of float16/bfloat16 inputs) small.
"""

from __future__ import annotations

import math

import torch

from .pair import MergedPair, _slots_from_mask
from .reference import LERP_EPS, SIN_EPS

# The cosine here is rounded (float32 dot over float32 norms: ~1e-7 relative), which moves an
# antiparallel pair's angle off pi by up to ~5e-4, where SLERP's weights are ill conditioned.
# Below this |sin(Omega)| the torch path uses the linear interpolation (the kernels, whose
# angle is exact near 0 and pi, use SIN_EPS).
TORCH_SIN_EPS = max(SIN_EPS, 2e-3)

# Tokens per chunk: 2 inputs x float32 x CHUNK_TOKENS x D = 4 MiB (fewer, larger ops).
_CHUNK_BYTES = 1 << 22


def _slerp_coefficients(n_p, n_c, dot, t: float):
    """Per-token scalars (a, b, d) such that e = a x_prev + b x_cur is the unit SLERP direction
    and d = Omega / pi. All inputs and outputs float32 `[...]`."""
    zero_p, zero_c = n_p == 0, n_c == 0
    inv_p = torch.where(zero_p, torch.zeros_like(n_p), 1.0 / n_p)
    inv_c = torch.where(zero_c, torch.zeros_like(n_c), 1.0 / n_c)
    cos = (dot * inv_p * inv_c).clamp_(-1.0, 1.0)       # 0 when either vector is zero
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() >= TORCH_SIN_EPS
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


def merge_torch(x_prev: torch.Tensor, x_cur: torch.Tensor, t: float, gamma: float,
                magnitude: str, d_range=None) -> MergedPair:
    """See `minitriton.merge` (arguments already validated).

    Two passes over chunks of tokens: the three per-token reductions (two norms, one dot),
    then, after the per-token scalar work done once over `[B, H, S]`, e = a x_prev + b x_cur.
    The scalar work is ~40 small torch ops: done per chunk it would cost more than the data.
    """
    B, H, S, D = x_prev.shape
    dev = x_prev.device
    e = torch.empty((B, H, S, D), dtype=x_prev.dtype, device=dev)
    n_p = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    n_c = torch.empty_like(n_p)
    dot = torch.empty_like(n_p)
    views, chunks = _token_chunks(x_prev, x_cur, dev.type == "cpu")
    xp_v, xc_v = views
    e_v, n_p_v, n_c_v, dot_v = (_like_view(y, xp_v) for y in (e, n_p, n_c, dot))
    for idx in chunks:
        xp32, xc32 = xp_v[idx].float(), xc_v[idx].float()
        n_p_v[idx] = torch.linalg.vector_norm(xp32, dim=-1)
        n_c_v[idx] = torch.linalg.vector_norm(xc32, dim=-1)
        dot_v[idx] = torch.linalg.vecdot(xp32, xc32)
    a, b, d = _slerp_coefficients(n_p, n_c, dot, t)
    a_v, b_v = (_like_view(y, xp_v).unsqueeze(-1) for y in (a, b))
    for idx in chunks:
        if e.dtype == torch.float32:      # write e in place: no float32 copy to cast from
            torch.mul(xp_v[idx], a_v[idx], out=e_v[idx])
            e_v[idx].addcmul_(xc_v[idx], b_v[idx])
        else:
            e32 = xp_v[idx].float() * a_v[idx]
            e32.addcmul_(xc_v[idx].float(), b_v[idx])
            e_v[idx] = e32
    if magnitude == "norm":
        mag_p, mag_c = n_p, n_c
    else:  # x . e with e = a x_prev + b x_cur, evaluated on the float32 e (before the cast)
        mag_p, mag_c = a * n_p * n_p + b * dot, a * dot + b * n_c * n_c
    d_min, d_max = d.amin(dim=-1), d.amax(dim=-1)
    return finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                        d_range, gather=gather_retained_torch)


def _token_chunks(x_prev, x_cur, chunked: bool):
    """Views of the inputs and the index of each chunk of tokens.

    Inputs whose (b, h, s) dims flatten without a copy are seen as `[B*H*S, D]` and cut into
    contiguous row ranges; others (e.g. a `[B, S, H, D]` buffer seen as `[B, H, S, D]`) stay
    4-d and are cut along S."""
    B, H, S, D = x_prev.shape
    try:
        views = (x_prev.view(-1, D), x_cur.view(-1, D))
        n, lead = B * H * S, ()
    except RuntimeError:
        views, n, lead = (x_prev, x_cur), S, (slice(None), slice(None))
    tokens_per_index = 1 if not lead else B * H
    step = n if not chunked else max(1, _CHUNK_BYTES // (8 * D * tokens_per_index))
    return views, [lead + (slice(i, min(n, i + step)),) for i in range(0, n, step)]


def _like_view(y, ref_view):
    """y (`[B, H, S, ...]`, contiguous) seen with the token layout of `ref_view`."""
    return y.view(-1, *y.shape[3:]) if ref_view.dim() == 2 else y


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
