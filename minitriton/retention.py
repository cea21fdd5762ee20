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

from .pair import MergedPair, _slots_from_mask


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


def finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                 d_range, gather, mask=None, keep=None) -> MergedPair:
    """Retention from d and the row extremes, then the retained store (`gather` is the
    backend's: it reads only the retained tokens). With a `mask` (bool `[B, S]`, False for
    padding) or a `keep` (bool `[B, S]`, True for a token kept as it is) the extremes are taken
    again from d over the other tokens (the backends' cover every position): a pass over d,
    4 bytes a token. Half-precision pairs with a magnitude beyond the dtype's range are
    retained (module docstring).

    The store is compact, so its size N is read on the host (one synchronisation)."""
    if (mask is not None or keep is not None) and d.shape[-1]:
        counted = d == d                                # tokens with an angle
        if mask is not None:
            counted &= mask.unsqueeze(1)
        if keep is not None:
            counted &= ~keep.unsqueeze(1)
        d_min = torch.where(counted, d, 2.0).amin(dim=-1)
        d_max = torch.where(counted, d, -1.0).amax(dim=-1)
    if d_range is not None:   # (fmin / fmax: a NaN counts as no earlier extreme)
        d_min = torch.fmin(d_min, d_range[0].to(d_min))
        d_max = torch.fmax(d_max, d_range[1].to(d_max))
    thr = retention_threshold(d_min, d_max, gamma)
    retained = torch.le(d, thr.unsqueeze(-1)).logical_not_()      # (NaN d: retained)
    if x_prev.dtype != torch.float32:   # (a pass over the magnitudes, 8 bytes a token)
        top = torch.maximum(mag_p, mag_c) if magnitude == "norm" \
            else torch.maximum(mag_p.abs(), mag_c.abs())       # (norms are >= 0)
        retained |= top > torch.finfo(x_prev.dtype).max
    if mask is not None:   # padding: only the pairs without an angle
        retained &= mask.unsqueeze(1) | (d != d)
    if keep is not None:
        retained |= keep.unsqueeze(1)
    slot = _slots_from_mask(retained)
    kept_prev, kept_cur = gather(x_prev, x_cur, retained)
    return MergedPair(e, mag_p, mag_c, slot, kept_prev, kept_cur, d_min, d_max,
                      float(t), float(gamma), magnitude)
