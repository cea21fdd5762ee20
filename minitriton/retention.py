"""Retention, shared by both backends: which token pairs are kept as they were, and the
MergedPair that holds the rest merged.

    retained iff d > d_max - (d_max - d_min) * gamma      (per (b, h) row; SPEC.md)

A token pair with a NaN or inf component, or with a vector longer than float32's largest number
(no float32 magnitude), has no angle: the backends give it d = NaN, which is always retained
(its originals come back bit for bit), and leave it out of d_min / d_max.

Padding (a `mask` of 0 for a token position, as in transformers' attention mask) is merged like
any token but left out of d_min / d_max and never retained, bar a pair without an angle: a
padded row keeps exactly the tokens that the same row unpadded keeps.

A float16 or bfloat16 pair whose magnitude (in either layer) is beyond the dtype's largest
number would restore to components outside its range: it is retained too (padding aside: it is
never attended), so that `restore` and `decode_attention` give it back as it was rather than
saturated. (Below that bound no restored component can pass it: |e_i| <= 1.)

Kept tokens (a `keep` of 1: e.g. a padded row's first tokens, which the same row unpadded holds
in a dense sink) are always retained and left out of d_min / d_max, as tokens outside the
merge would be.
"""

from __future__ import annotations

import torch

from .pair import MergedPair


def retention_threshold(d_min: torch.Tensor, d_max: torch.Tensor, gamma: float) -> torch.Tensor:
    """float32 `[B, H]`: a token is retained iff d > threshold (SPEC: strict).

    d_max - (d_max - d_min) * gamma is non-increasing in gamma in floating point (each operation
    rounds monotonically); clamping at d_min and pinning gamma = 1 to d_min exactly make
    gamma = 1 retain all but the least distant token despite rounding. At the other end, a
    gamma > 0 so small that the product is below half an ulp of d_max would round the threshold
    to d_max, and retain nothing as gamma = 0 does: it is held one float32 step below d_max
    (where d_max > d_min), so that the most distant token is retained, as in exact arithmetic.
    """
    if gamma >= 1.0:
        return d_min.clone()
    thr = torch.maximum(d_max - (d_max - d_min) * gamma, d_min)
    if gamma > 0.0:
        below = torch.nextafter(d_max, torch.full_like(d_max, -1.0))
        thr = torch.where(d_max > d_min, torch.minimum(thr, below), thr)
    return thr


def finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                 d_range, select, counted_extremes, mask=None, keep=None) -> MergedPair:
    """Retention from d and the row extremes, then the retained store. With a `mask` (bool
    `[B, S]`, False for padding) or a `keep` (bool `[B, S]`, True for a token kept as it is)
    the extremes are taken again from d over the other tokens (the backends' cover every
    position) by the backend's `counted_extremes(d, mask, keep)`. Half-precision pairs with a
    magnitude beyond the dtype's range are retained (module docstring).

    `select(thr, bound, mask, keep) -> (slot, kept_prev, kept_cur)` is the backend's: it marks
    the retained tokens from d, the float32 thresholds `[B, H]`, the range bound (None for
    float32) and the masks, numbers them, and reads only them into the compact store, whose
    size N it reads on the host (one synchronisation)."""
    if mask is not None or keep is not None:
        d_min, d_max = counted_extremes(d, mask, keep)
    if d_range is not None:   # (fmin / fmax: a NaN counts as no earlier extreme)
        d_min = torch.fmin(d_min, d_range[0].to(d_min))
        d_max = torch.fmax(d_max, d_range[1].to(d_max))
    thr = retention_threshold(d_min, d_max, gamma)
    bound = None if x_prev.dtype == torch.float32 else torch.finfo(x_prev.dtype).max
    slot, kept_prev, kept_cur = select(thr, bound, mask, keep)
    return MergedPair(e, mag_p, mag_c, slot, kept_prev, kept_cur, d_min, d_max,
                      float(t), float(gamma), magnitude)


def counted_extremes_torch(d, mask, keep):
    """float32 `[B, H]` d_min, d_max over the tokens that count (with an angle, not padding,
    not kept), in torch ops (the torch path's; the Triton path's kernel takes them in one
    pass). 2 / -1 for a row with none."""
    B, H, S = d.shape
    if not S:   # (the extremes of nothing)
        return (torch.full((B, H), 2.0, dtype=torch.float32, device=d.device),
                torch.full((B, H), -1.0, dtype=torch.float32, device=d.device))
    counted = d == d                                # tokens with an angle
    if mask is not None:
        counted &= mask.unsqueeze(1)
    if keep is not None:
        counted &= ~keep.unsqueeze(1)
    return torch.where(counted, d, 2.0).amin(dim=-1), torch.where(counted, d, -1.0).amax(dim=-1)


def retained_mask(d, thr, mag_p, mag_c, magnitude, bound, mask=None, keep=None):
    """bool `[B, H, S]`: the retention rule in torch ops (the torch path's marking; the Triton
    path's mark kernel applies the same rule in one pass). NaN d (no angle) is retained."""
    retained = torch.le(d, thr.unsqueeze(-1)).logical_not_()
    if bound is not None:   # (a pass over the magnitudes, 8 bytes a token)
        top = torch.maximum(mag_p, mag_c) if magnitude == "norm" \
            else torch.maximum(mag_p.abs(), mag_c.abs())       # (norms are >= 0)
        retained |= top > bound
    if mask is not None:   # padding: only the pairs without an angle
        retained &= mask.unsqueeze(1) | (d != d)
    if keep is not None:
        retained |= keep.unsqueeze(1)
    return retained
