"""The numpy float64 reference of MiniCache: the oracle every kernel and the torch path are
tested against. Written to be read beside the paper (Liu et al., 2024, Sec. 4) and SPEC.md.

Shapes: x_prev, x_cur `[B, H, S, D]` (layer l-1 and layer l of a merged pair).
Everything here is float64 and loops nowhere it does not have to.
"""

from __future__ import annotations

import numpy as np

# Below this |sin(Omega)| the SLERP weights are 0/0-like: use the normalised linear interpolation.
SIN_EPS = 1e-4
# Below this norm the interpolation itself is "zero": take u_c (antiparallel at t = 0.5), or u_p
# when x_cur is the zero vector (a zero partner at t = 0 or 1).
LERP_EPS = 1e-6
# Magnitudes are stored in float32: a vector whose norm rounds beyond its largest number (to
# inf) has no magnitude.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# ... and a vector shorter than its smallest normal number (1.2e-38) counts as a zero vector
# (its float32 norm would be subnormal, with fewer significant bits; 1 / |x| overflows float32
# below 2.9e-39). Its projection x . e is what it is.
MIN_NORMAL = float(np.finfo(np.float32).tiny)


def _as64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude |x| and direction x / |x| (the zero vector, and any vector shorter than
    MIN_NORMAL, has magnitude and direction 0)."""
    n = np.linalg.norm(x, axis=-1)
    n = np.where(n < MIN_NORMAL, 0.0, n)
    u = np.divide(x, n[..., None], out=np.zeros_like(x), where=n[..., None] > 0)
    return n, u


def slerp_direction(u_p: np.ndarray, u_c: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2 of the paper: the spherical interpolation of two unit directions.

        Omega = arccos(clamp(u_p . u_c, -1, 1))
        e = sin((1 - t) Omega) / sin(Omega) u_p + sin(t Omega) / sin(Omega) u_c

    Returns (e renormalised to unit length, Omega).

    Where e is (near) zero there is no direction in between: take u_c, or u_p when u_c is zero.
    That happens for antiparallel directions at t = 0.5, and next to a zero vector at t = 0 or 1
    (x_prev = 0 at t = 0, x_cur = 0 at t = 1), where the other layer keeps its own direction and
    so its magnitude survives. Only when both are zero is e zero.
    """
    cos = np.clip(np.sum(u_p * u_c, axis=-1), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    safe = np.abs(sin) >= SIN_EPS
    sin_ = np.where(safe, sin, 1.0)
    w_p = np.where(safe, np.sin((1.0 - t) * omega) / sin_, 1.0 - t)   # nlerp where unsafe
    w_c = np.where(safe, np.sin(t * omega) / sin_, t)
    e = w_p[..., None] * u_p + w_c[..., None] * u_c
    n_e = np.linalg.norm(e, axis=-1)
    has_c = np.linalg.norm(u_c, axis=-1, keepdims=True) > 0
    fallback = np.where(has_c, u_c, u_p)                     # u_c, or u_p when x_cur = 0
    degenerate = n_e < LERP_EPS
    e = np.where(degenerate[..., None], fallback, e)
    n_e = np.where(degenerate, np.linalg.norm(fallback, axis=-1), n_e)
    e = np.divide(e, n_e[..., None], out=np.zeros_like(e), where=n_e[..., None] > 0)
    return e, omega


def retention_threshold(d_min, d_max, gamma: float):
    """Eq. 5, read with d = Omega / pi: a token is retained iff d > threshold.

    gamma = 0 gives d_max (nothing retained), gamma = 1 gives d_min (all but the least distant):
    the formula is pinned there, and never goes below d_min, whatever its rounding. Any
    gamma > 0 retains the most distant token, as in exact arithmetic, even where the product
    is too small to move d_max in floating point.
    """
    d_min, d_max = np.asarray(d_min, dtype=np.float64), np.asarray(d_max, dtype=np.float64)
    if gamma >= 1.0:
        return d_min.copy()
    thr = np.maximum(d_max - (d_max - d_min) * gamma, d_min)
    if gamma > 0.0:
        thr = np.where(d_max > d_min, np.minimum(thr, np.nextafter(d_max, -np.inf)), thr)
    return thr


def merge_ref(x_prev, x_cur, t: float = 0.6, gamma: float = 0.05, magnitude: str = "norm",
              d_range=None, mask=None, keep=None, dtype_max=None) -> dict:
    """MiniCache merge of one layer pair, in float64.

    Returns a dict of numpy arrays:
        e `[B, H, S, D]`, mag_prev / mag_cur `[B, H, S]`, d `[B, H, S]` (angular distance),
        d_min / d_max `[B, H]`, threshold `[B, H]`, retained bool `[B, H, S]`,
        x_prev / x_cur (the float64 inputs, for restore_ref).
    d_range: optional (d_min, d_max) `[B, H]` of earlier tokens of the same rows.
    mask: optional `[B, S]`, nonzero for a token, 0 for padding: padding is merged like any
    token but is left out of the row's extremes and never retained (unless it has no angle).
    keep: optional `[B, S]`, nonzero for a token pair kept as it is: always retained, and left
    out of the row's extremes.
    dtype_max: the largest number of the cache's dtype when it is float16 or bfloat16: a pair
    whose magnitude (either layer, as stored: in float32) is beyond it is kept as it is (its
    restore would leave the dtype's range), bar padding, and still counts in its row's
    extremes.
    """
    x_p, x_c = _as64(x_prev), _as64(x_cur)
    with np.errstate(invalid="ignore", over="ignore"):   # (non-finite tokens: set below)
        n_p, u_p = _unit(x_p)                          # magnitudes and directions (Eq. 1)
        n_c, u_c = _unit(x_c)
        # A token pair with a NaN or inf component, or with a vector longer than float32's
        # largest number (its norm rounds to inf in float32, which holds the magnitudes), has
        # no angle: it is kept as it is (d = NaN, always retained), its e and magnitudes are 0,
        # and it does not count in its row's extremes.
        has_angle = (np.isfinite(x_p).all(axis=-1) & np.isfinite(x_c).all(axis=-1)
                     & np.isfinite(n_p.astype(np.float32)) & np.isfinite(n_c.astype(np.float32)))
        e, omega = slerp_direction(u_p, u_c, t)        # shared direction (Eq. 2)
        if magnitude == "norm":                        # the paper: keep |x|
            mag_p, mag_c = n_p, n_c
        elif magnitude == "projection":                # least squares on the line of e
            mag_p, mag_c = np.sum(x_p * e, axis=-1), np.sum(x_c * e, axis=-1)
        else:
            raise ValueError(f"magnitude: expected 'norm' or 'projection', got {magnitude!r}")
    d = np.where(has_angle, omega / np.pi, np.nan)     # angular distance in [0, 1]
    e = np.where(has_angle[..., None], e, 0.0)
    mag_p, mag_c = np.where(has_angle, mag_p, 0.0), np.where(has_angle, mag_c, 0.0)
    # Each (b, h) row's extremes over its tokens with an angle; with none, the extremes of
    # nothing (2 and -1: every later extreme replaces them).
    # Padding (mask 0) does not count either, nor do the pairs kept as they are (keep 1).
    is_token = np.ones(d.shape, dtype=bool) if mask is None \
        else np.broadcast_to(np.asarray(mask)[:, None, :] != 0, d.shape)
    kept = np.zeros(d.shape, dtype=bool) if keep is None \
        else np.broadcast_to(np.asarray(keep)[:, None, :] != 0, d.shape)
    d_min = np.min(d, axis=-1, where=has_angle & is_token & ~kept, initial=2.0)
    d_max = np.max(d, axis=-1, where=has_angle & is_token & ~kept, initial=-1.0)
    if d_range is not None:
        d_min = np.fmin(d_min, _as64(d_range[0]))     # (a NaN: no earlier extreme)
        d_max = np.fmax(d_max, _as64(d_range[1]))
    thr = retention_threshold(d_min, d_max, gamma)
    # The most distinct pairs (Eq. 5) among the tokens, the pairs without an angle (d = NaN),
    # the pairs kept as they are, and those whose restore would leave the dtype's range.
    beyond = np.zeros(d.shape, dtype=bool) if dtype_max is None else \
        np.maximum(np.abs(mag_p.astype(np.float32)), np.abs(mag_c.astype(np.float32))) > dtype_max
    retained = (is_token & ((d > thr[..., None]) | beyond)) | ~has_angle | kept
    return dict(e=e, mag_prev=mag_p, mag_cur=mag_c, d=d, d_min=d_min, d_max=d_max,
                threshold=thr, retained=retained, x_prev=x_p, x_cur=x_c)


def restore_ref(m: dict) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3: x_hat = magnitude * e, and retained tokens take back their originals."""
    r = m["retained"][..., None]
    x_p_hat = np.where(r, m["x_prev"], m["mag_prev"][..., None] * m["e"])
    x_c_hat = np.where(r, m["x_cur"], m["mag_cur"][..., None] * m["e"])
    return x_p_hat, x_c_hat


def decode_attention_ref(q, k_hat, v_hat, k_tail=None, v_tail=None, seq_lens=None,
                         tail_lens=None, sm_scale=None, seq_starts=None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention of one query token per sequence over dense keys/values, float64.

    q `[B, Hq, D]`; k_hat, v_hat `[B, H, S, D]` (a restored layer); k_tail, v_tail `[B, H, T, D]`;
    seq_lens, tail_lens `[B]` (defaults S and T); seq_starts `[B]` (default 0): row b attends to
    k_hat[b, :, seq_starts[b]:seq_lens[b]], then to its tail. Query head i reads KV head
    i // (Hq // H).
    Returns (o `[B, Hq, D]`, lse `[B, Hq]`, natural log of the softmax denominator of the scaled
    scores). A row with no token gives o = 0 and lse = -inf.
    """
    q, k_hat, v_hat = _as64(q), _as64(k_hat), _as64(v_hat)
    B, Hq, D = q.shape
    H, S = k_hat.shape[1], k_hat.shape[2]
    G = Hq // H
    scale = 1.0 / np.sqrt(D) if sm_scale is None else float(sm_scale)
    T = 0 if k_tail is None else k_tail.shape[2]
    seq_lens = np.full(B, S) if seq_lens is None else _as64(seq_lens).astype(np.int64)
    tail_lens = np.full(B, T) if tail_lens is None else _as64(tail_lens).astype(np.int64)
    starts = np.zeros(B, np.int64) if seq_starts is None else _as64(seq_starts).astype(np.int64)
    o = np.zeros((B, Hq, D))
    lse = np.full((B, Hq), -np.inf)
    for b in range(B):
        ks = [k_hat[b, :, starts[b]: max(starts[b], seq_lens[b])]]
        vs = [v_hat[b, :, starts[b]: max(starts[b], seq_lens[b])]]
        if T:
            ks.append(_as64(k_tail)[b, :, : tail_lens[b]])
            vs.append(_as64(v_tail)[b, :, : tail_lens[b]])
        k_b, v_b = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)   # [H, n, D]
        if k_b.shape[1] == 0:
            continue
        k_b, v_b = np.repeat(k_b, G, axis=0), np.repeat(v_b, G, axis=0)     # [Hq, n, D]
        s = np.einsum("hd,hnd->hn", q[b], k_b) * scale
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        den = p.sum(axis=-1, keepdims=True)
        o[b] = np.einsum("hn,hnd->hd", p / den, v_b)
        lse[b] = (m + np.log(den))[:, 0]
    return o, lse
