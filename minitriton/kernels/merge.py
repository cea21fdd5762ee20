"""The fused MiniCache merge: one pass over both inputs, then the retained tokens' gather.

Pass 1 (`_merge_kernel`, one program per BLOCK_S tokens of one (b, h) row) reads each input
once and writes e, both magnitudes, the angular distance d, and the row's running d_min / d_max
(float atomics: min / max are exact and order independent, so results do not depend on the
schedule). `_mark_kernel` reads d (and, in float16/bfloat16, the magnitudes, for the range rule)
once and writes a flag byte per token and a count per tile of tokens; the counts' prefix sum
gives each tile its first row of the store, and N; `_number_kernel` reads the flags and writes
the slots and the retained tokens' indices; `_gather_kernel` then reads only the retained tokens
again and writes the compact store. With a padding mask or kept tokens, `_extremes_kernel`
first takes each row's extremes again over the tokens that count (d and the masks, once).

A token pair with a NaN or inf component, or with a vector longer than float32's largest number,
has no angle: pass 1 gives it d = NaN (its norm is NaN, and NaN propagates through the
direction and the angle) and leaves it out of the extremes; the mark retains it, and the gather
clears its e and magnitudes, so that no NaN is left outside the store.

Omega is computed as 2 atan2(|u_p - u_c|, |u_p + u_c|) rather than arccos(u_p . u_c): the same
angle, but well conditioned near 0 and pi, where arccos loses half the digits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pair import MergedPair
from ..reference import FLOAT32_MAX, LERP_EPS, MIN_NORMAL, SIN_EPS
from ..retention import finish_merge
from .common import (PI, atan2_nonneg, batch_chunks, block_d, saturate, tile_pruner,
                     token_tile_autotune, token_tile_configs)

# Globals a kernel reads must be constexpr.
_PI = tl.constexpr(PI)
_SIN_EPS = tl.constexpr(SIN_EPS)
_LERP_EPS = tl.constexpr(LERP_EPS)
_FLOAT32_MAX = tl.constexpr(FLOAT32_MAX)


# Rows with a component above _BIG are scaled before squaring: 256 components of 2^56 square
# and sum to 2^120, far from float32's 2^128. Rows whose components are all below _SMALL are
# scaled up by _UP (exact, a power of two), into [2^-53, 2^56): their squares would be
# subnormal (|x| < 2^-63), lose bits, or be flushed to 0 by a GPU; the largest square stays
# 2^-80 above where the others may flush.
_BIG = tl.constexpr(2.0 ** 56)
_UNSCALED = tl.constexpr(2.0 ** -55)   # 1 / their largest component after the scaling
_SMALL = tl.constexpr(2.0 ** -40)
_UP = tl.constexpr(2.0 ** 96)
# A norm below float32's smallest normal number counts as 0 (a zero vector): it would be
# subnormal, with fewer significant bits, and 1 / |x| overflows below 2.9e-39.
_MIN_NORMAL = tl.constexpr(MIN_NORMAL)


@triton.jit
def _row_scale(b_x):
    """r, `[BLOCK_S]`: 2^55 / (largest |component|) for rows with one above 2^56; 2^96 for rows
    whose components are all below 2^-40 (zero rows too); else 1; 0 for a row with an inf, so
    that its sum of squares, and its norm, is NaN (a NaN component does that by itself). r
    stays a normal float (>= 2^-73), where 1 / max would be subnormal above 2^126, with fewer
    significant bits (or 0 wherever subnormals are flushed). (Computed as 1 / (max 2^-55): the
    product is exact, and ptxas allocates this form without spills on every triton checked.)"""
    big = tl.max(tl.abs(b_x), axis=1)
    up = tl.where(big < _SMALL, _UP, 1.0)   # (this order: no spill with triton 3.6's ptxas)
    return tl.where(big > _BIG, 1.0 / tl.where(big > _BIG, big * _UNSCALED, 1.0), up)


# At most 8 elements of a [BLOCK_S, BLOCK_D] tile per thread: pass 1 keeps about seven float32
# tiles live (inputs, directions, e and the difference/sum), and 16 a thread already spills on
# sm_80 (215 registers + stack at BLOCK_S=32, D=128, 8 warps). BLOCK_S = 4 is not offered: at
# D = 256 ptxas spills 8 bytes for it on sm_90 even at 64 registers.
_prune = tile_pruner(8)


@triton.jit(do_not_specialize=["S"])
def _merge_kernel(
    xp_ptr, xc_ptr, e_ptr, magp_ptr, magc_ptr, d_ptr, dmin_ptr, dmax_ptr,
    H, S, D,
    sp_b, sp_h, sp_s, sp_d, sc_b, sc_h, sc_s, sc_d,
    t,
    PROJECTION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (S tiles, H, B): axis x takes up to 2^31 - 1 tiles, y and z up to 65535 (the
    # launcher splits a larger batch); no integer division.
    i_s = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)                              # [BLOCK_S]
    o_d = tl.arange(0, BLOCK_D)                                              # [BLOCK_D]
    o_d64 = o_d.to(tl.int64)  # (D offsets times a stride may pass 2^31)
    m_s = o_s < S
    m_sd = m_s[:, None] & (o_d[None, :] < D)                                 # [BLOCK_S, BLOCK_D]

    p_xp = xp_ptr + i_b * sp_b + i_h * sp_h + o_s[:, None] * sp_s + o_d64[None, :] * sp_d
    p_xc = xc_ptr + i_b * sc_b + i_h * sc_h + o_s[:, None] * sc_s + o_d64[None, :] * sc_d
    b_xp = tl.load(p_xp, mask=m_sd, other=0.0).to(tl.float32)               # [BLOCK_S, BLOCK_D]
    b_xc = tl.load(p_xc, mask=m_sd, other=0.0).to(tl.float32)

    # Magnitudes and directions (a zero vector has direction 0). sqrt_rn: tl.sqrt is the GPU's
    # approximate square root, which flushes a subnormal sum of squares (|x| < 1.1e-19) to 0.
    # A row with a component above 2^56 is scaled down before squaring (its sum of squares
    # could overflow float32), one with all below 2^-40 up by 2^96 (its squares could
    # underflow); every other row is multiplied by 1, exactly.
    r_p = _row_scale(b_xp)                                                   # [BLOCK_S]
    r_c = _row_scale(b_xc)
    n_p = tl.sqrt_rn(tl.sum((b_xp * r_p[:, None]) * (b_xp * r_p[:, None]), axis=1)) / r_p
    n_c = tl.sqrt_rn(tl.sum((b_xc * r_c[:, None]) * (b_xc * r_c[:, None]), axis=1)) / r_c
    # A vector longer than float32's largest number (its norm overflowed to inf) has no
    # magnitude to store: NaN, as for a NaN or inf component, so that the pair has no angle.
    # One shorter than its smallest normal number is a zero vector. (NaN stays NaN.)
    n_p = tl.where(n_p > _FLOAT32_MAX, n_p * 0.0, tl.where(n_p < _MIN_NORMAL, 0.0, n_p))
    n_c = tl.where(n_c > _FLOAT32_MAX, n_c * 0.0, tl.where(n_c < _MIN_NORMAL, 0.0, n_c))
    # A zero vector: its norm is the smaller one. (Not where the other norm is NaN: see d.)
    zero = tl.minimum(n_p, n_c, propagate_nan=tl.PropagateNan.ALL) == 0
    # (1 / NaN = NaN: NaN propagates to the directions, and from them to the angle and d.
    # Above 2^126, 1 / |x| is subnormal, with fewer significant bits: the direction's length
    # is then off by up to ~1e-6. Dividing the scaled rows instead costs registers that spill.)
    inv_p = tl.where(n_p == 0, 0.0, 1.0 / tl.where(n_p == 0, 1.0, n_p))
    inv_c = tl.where(n_c == 0, 0.0, 1.0 / tl.where(n_c == 0, 1.0, n_c))
    b_up = b_xp * inv_p[:, None]
    b_uc = b_xc * inv_c[:, None]

    # Omega/2 = atan2(|u_p - u_c|, |u_p + u_c|); sin(Omega) = |u_p - u_c| |u_p + u_c| / 2.
    # With a zero vector the spec's cosine is 0: Omega = pi / 2.
    b_dif = b_up - b_uc
    b_sum = b_up + b_uc
    l_dif = tl.sqrt(tl.sum(b_dif * b_dif, axis=1))
    l_sum = tl.sqrt(tl.sum(b_sum * b_sum, axis=1))
    omega = tl.where(zero, 0.5 * _PI, 2.0 * atan2_nonneg(l_dif, l_sum))
    sin = tl.where(zero, 1.0, 0.5 * l_dif * l_sum)

    # SLERP weights; normalised linear interpolation where sin(Omega) ~ 0.
    safe = sin >= _SIN_EPS
    sin_ = tl.where(safe, sin, 1.0)
    w_p = tl.where(safe, tl.sin((1.0 - t) * omega) / sin_, 1.0 - t)
    w_c = tl.where(safe, tl.sin(t * omega) / sin_, t)
    # Next to a zero vector e is the other direction, at every t (the spec's e = 0 at t = 0 or
    # 1 there is "no direction in between": take u_c, or u_p when x_cur is zero). One of the
    # two directions is 0, so u_p + u_c is the other one.
    w_p = tl.where(zero, 1.0, w_p)
    w_c = tl.where(zero, 1.0, w_c)
    b_e = w_p[:, None] * b_up + w_c[:, None] * b_uc
    n_e = tl.sqrt(tl.sum(b_e * b_e, axis=1))
    # antiparallel at t = 0.5: take u_c ("safe == 0": triton 3.2-3.3's interpreter cannot invert
    # a boolean with ~)
    degenerate = (safe == 0) & (n_e < _LERP_EPS)
    b_e = tl.where(degenerate[:, None], b_uc, b_e)
    n_e = tl.where(degenerate, tl.where(n_c > 0, 1.0, 0.0), n_e)
    b_e = b_e * tl.where(n_e > 0, 1.0 / tl.where(n_e > 0, n_e, 1.0), 0.0)[:, None]

    if PROJECTION:   # (|x . e| <= |x|; rounding may pass float32's largest number: clamped)
        mag_p = saturate(tl.sum(b_xp * b_e, axis=1), _FLOAT32_MAX)
        mag_c = saturate(tl.sum(b_xc * b_e, axis=1), _FLOAT32_MAX)
    else:
        mag_p = n_p
        mag_c = n_c
    d = omega * (1.0 / _PI)

    o_tok = i_bh * S + o_s                                                  # [BLOCK_S]
    p_e = e_ptr + o_tok[:, None] * D + o_d[None, :]
    tl.store(p_e, b_e.to(e_ptr.dtype.element_ty), mask=m_sd)
    tl.store(magp_ptr + o_tok, mag_p, mask=m_s)
    tl.store(magc_ptr + o_tok, mag_c, mask=m_s)
    tl.store(d_ptr + o_tok, d, mask=m_s)
    m_f = m_s & (d == d)
    tl.atomic_min(dmin_ptr + i_bh, tl.min(tl.where(m_f, d, 2.0), axis=0))
    tl.atomic_max(dmax_ptr + i_bh, tl.max(tl.where(m_f, d, -1.0), axis=0))


# The row extremes are folded in with atomics: tuning's runs of the other configs must not
# leave theirs (configs reduce over D in different orders, so d may differ by an ulp).
_merge_autotuned = token_tile_autotune(_merge_kernel, _prune,
                                       restore_value=("dmin_ptr", "dmax_ptr"))


@triton.jit(do_not_specialize=["S", "n_tiles"])
def _extremes_kernel(
    d_ptr, mask_ptr, keep_ptr, dmin_ptr, dmax_ptr, H, S, n_tiles, sm_b, sm_s, sk_b, sk_s,
    HAS_MASK: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """A row's d_min / d_max over the tokens that count (with an angle, not padding, not
    kept), folded with float atomics from BLOCK_S tokens of one (b, h) row (program
    `row * n_tiles + tile`) into extremes that start at 2 / -1."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles                  # b * H + h
    o_s = (pid % n_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = o_s < S
    d = tl.load(d_ptr + row * S + o_s, mask=m_s, other=float("nan"))
    counted = d == d
    i_b = row // H
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + i_b * sm_b + o_s * sm_s, mask=m_s, other=0) != 0)
    if HAS_KEEP:
        counted = counted & (tl.load(keep_ptr + i_b * sk_b + o_s * sk_s, mask=m_s, other=1) == 0)
    tl.atomic_min(dmin_ptr + row, tl.min(tl.where(counted, d, 2.0), axis=0))
    tl.atomic_max(dmax_ptr + row, tl.max(tl.where(counted, d, -1.0), axis=0))


@triton.jit(do_not_specialize=["S", "n_tiles"])
def _mark_kernel(
    d_ptr, thr_ptr, magp_ptr, magc_ptr, mask_ptr, keep_ptr, flag_ptr, count_ptr,
    H, S, n_tiles, sm_b, sm_s, sk_b, sk_s, MAG_MAX,
    RANGE_RULE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Mark BLOCK_S tokens of one (b, h) row (program `row * n_tiles + tile`): retained iff
    not d <= thr (NaN d, no angle, is retained); with RANGE_RULE also where a magnitude is
    beyond MAG_MAX (float16/bfloat16); with HAS_MASK padding only when it has no angle; with
    HAS_KEEP every kept token. Writes the flags (int8) and the tile's count."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_tiles                  # b * H + h
    o_s = (pid % n_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = o_s < S
    tok = row * S + o_s
    d = tl.load(d_ptr + tok, mask=m_s, other=0.0)
    ret = (d <= tl.load(thr_ptr + row)) == 0
    if RANGE_RULE:
        top = tl.maximum(tl.abs(tl.load(magp_ptr + tok, mask=m_s, other=0.0)),
                         tl.abs(tl.load(magc_ptr + tok, mask=m_s, other=0.0)))
        ret = ret | (top > MAG_MAX)
    i_b = row // H
    if HAS_MASK:
        token = tl.load(mask_ptr + i_b * sm_b + o_s * sm_s, mask=m_s, other=1) != 0
        ret = ret & (token | (d != d))
    if HAS_KEEP:
        ret = ret | (tl.load(keep_ptr + i_b * sk_b + o_s * sk_s, mask=m_s, other=0) != 0)
    ret = ret & m_s
    tl.store(flag_ptr + tok, ret.to(tl.int8), mask=m_s)
    tl.store(count_ptr + pid, tl.sum(ret.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["S", "n_tiles"])
def _number_kernel(flag_ptr, start_ptr, slot_ptr, idx_ptr, S, n_tiles, BLOCK_S: tl.constexpr):
    """Number the marked tokens of one tile from the tile's start (the retained tokens before
    it in (b, h, s) order): slot = the token's row of the store, -1 if merged; idx[slot] = the
    token's flat index (b*H + h)*S + s, which the gather reads."""
    pid = tl.program_id(0).to(tl.int64)
    o_s = (pid % n_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = o_s < S
    tok = (pid // n_tiles) * S + o_s
    flag = tl.load(flag_ptr + tok, mask=m_s, other=0).to(tl.int32)
    row = tl.load(start_ptr + pid) + (tl.cumsum(flag, axis=0) - flag)      # int64
    tl.store(slot_ptr + tok, tl.where(flag != 0, row, -1).to(tl.int32), mask=m_s)
    tl.store(idx_ptr + row, tok, mask=m_s & (flag != 0))


# N (the retained tokens: the data's) and S are not specialised: a new N would otherwise build
# the kernel again whenever it turns 1, a multiple of 16, or neither.
@triton.jit(do_not_specialize=["N", "S"])
def _gather_kernel(
    xp_ptr, xc_ptr, idx_ptr, kp_ptr, kc_ptr, e_ptr, magp_ptr, magc_ptr, d_ptr,
    N, H, S, D,
    sp_b, sp_h, sp_s, sp_d, sc_b, sc_h, sc_s, sc_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Copy the retained tokens' originals: row r of the store is token idx[r] = (b*H + h)*S + s.
    Those without an angle (d = NaN) get e and magnitudes 0."""
    i_r = tl.program_id(0).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)                              # [BLOCK_R]
    o_d = tl.arange(0, BLOCK_D)
    o_d64 = o_d.to(tl.int64)  # (D offsets times a stride may pass 2^31)
    m_r = o_r < N
    m_rd = m_r[:, None] & (o_d[None, :] < D)
    tok = tl.load(idx_ptr + o_r, mask=m_r, other=0)
    i_b, i_h, i_s = tok // (H * S), (tok // S) % H, tok % S
    p_xp = xp_ptr + (i_b * sp_b + i_h * sp_h + i_s * sp_s)[:, None] + o_d64[None, :] * sp_d
    p_xc = xc_ptr + (i_b * sc_b + i_h * sc_h + i_s * sc_s)[:, None] + o_d64[None, :] * sc_d
    # A plain copy in the input dtype: the store must be bit-exact.
    tl.store(kp_ptr + o_r[:, None] * D + o_d[None, :], tl.load(p_xp, mask=m_rd), mask=m_rd)
    tl.store(kc_ptr + o_r[:, None] * D + o_d[None, :], tl.load(p_xc, mask=m_rd), mask=m_rd)
    d = tl.load(d_ptr + tok, mask=m_r, other=0.0)
    m_nan = m_r & ((d == d) == 0)
    tl.store(magp_ptr + tok, tl.zeros([BLOCK_R], tl.float32), mask=m_nan)
    tl.store(magc_ptr + tok, tl.zeros([BLOCK_R], tl.float32), mask=m_nan)
    tl.store(e_ptr + tok[:, None] * D + o_d[None, :],
             tl.zeros([BLOCK_R, BLOCK_D], tl.float32).to(e_ptr.dtype.element_ty),
             mask=m_nan[:, None] & (o_d[None, :] < D))


GATHER_ROWS = 16
MARK_TOKENS = 1024   # tokens per program of the mark and number kernels


def _mask_args(mask, keep, placeholder):
    """(mask, keep) pointers and strides for the kernels: bool `[B, S]` tensors read as bytes;
    an absent one is a placeholder never loaded."""
    parts = [(x.view(torch.uint8), *x.stride()) if x is not None else (placeholder, 0, 0)
             for x in (mask, keep)]
    return parts[0][0], parts[1][0], parts[0][1], parts[0][2], parts[1][1], parts[1][2]


def counted_extremes_triton(d, mask, keep):
    """float32 `[B, H]` d_min, d_max over the tokens that count (with an angle, not padding,
    not kept): one pass over d (4 bytes a token) and the masks. 2 / -1 for a row with none."""
    B, H, S = d.shape
    d_min = torch.full((B, H), 2.0, dtype=torch.float32, device=d.device)
    d_max = torch.full((B, H), -1.0, dtype=torch.float32, device=d.device)
    n_tiles = triton.cdiv(S, MARK_TOKENS)
    if B * H * n_tiles:
        m, k, sm_b, sm_s, sk_b, sk_s = _mask_args(mask, keep, d)
        _extremes_kernel[(B * H * n_tiles,)](d, m, k, d_min, d_max, H, S, n_tiles, sm_b, sm_s,
                                             sk_b, sk_s, HAS_MASK=mask is not None,
                                             HAS_KEEP=keep is not None, BLOCK_S=MARK_TOKENS,
                                             num_warps=4)
    return d_min, d_max


def select_retained_triton(x_prev, x_cur, e, mag_p, mag_c, d, thr, bound, mask, keep):
    """Mark, number and gather the retained tokens: `(slot, kept_prev, kept_cur)`.

    The mark kernel reads d (and, in float16/bfloat16, the magnitudes) once and writes a flag
    byte and a count per tile; the counts' prefix sum gives each tile its first row of the
    store and N, read on the host (the one synchronisation of merge, to size the store); the
    number kernel reads the flags and writes the slots and the retained tokens' indices, and
    the gather reads only those tokens again. Tokens without an angle (d = NaN) get e and
    magnitudes 0 there."""
    B, H, S, D = x_prev.shape
    dev = x_prev.device
    slot = torch.empty((B, H, S), dtype=torch.int32, device=dev)
    n_tiles = triton.cdiv(S, MARK_TOKENS)
    grid = (B * H * n_tiles,)
    if grid[0] == 0:
        idx = torch.empty(0, dtype=torch.int64, device=dev)
    else:
        flag = torch.empty((B, H, S), dtype=torch.int8, device=dev)
        counts = torch.empty(grid[0], dtype=torch.int32, device=dev)
        m, k, sm_b, sm_s, sk_b, sk_s = _mask_args(mask, keep, flag)
        _mark_kernel[grid](d, thr, mag_p, mag_c, m, k, flag, counts, H, S, n_tiles, sm_b, sm_s,
                           sk_b, sk_s, 0.0 if bound is None else bound,
                           RANGE_RULE=bound is not None,
                           HAS_MASK=mask is not None, HAS_KEEP=keep is not None,
                           BLOCK_S=MARK_TOKENS, num_warps=4)
        ends = torch.cumsum(counts, 0, dtype=torch.int64)
        idx = torch.empty(int(ends[-1]), dtype=torch.int64, device=dev)   # (synchronises)
        _number_kernel[grid](flag, ends - counts, slot, idx, S, n_tiles, BLOCK_S=MARK_TOKENS,
                             num_warps=4)
    return (slot, *gather_retained_triton(x_prev, x_cur, idx, e, mag_p, mag_c, d))


def gather_retained_triton(x_prev: torch.Tensor, x_cur: torch.Tensor, idx: torch.Tensor,
                           e: torch.Tensor, mag_p: torch.Tensor, mag_c: torch.Tensor,
                           d: torch.Tensor):
    """The originals `[N, D]` each of the tokens `idx` (int64 `[N]`, flat (b, h, s) indices in
    increasing order); e and magnitudes of those whose d (pass 1's, `[B, H, S]`) is NaN are
    set to 0 in place."""
    B, H, S, D = x_prev.shape
    N = idx.numel()
    kept_prev = torch.empty((N, D), dtype=x_prev.dtype, device=x_prev.device)
    kept_cur = torch.empty_like(kept_prev)
    if N:
        _gather_kernel[(triton.cdiv(N, GATHER_ROWS),)](
            x_prev, x_cur, idx, kept_prev, kept_cur, e, mag_p, mag_c, d, N, H, S, D,
            *x_prev.stride(), *x_cur.stride(),
            BLOCK_R=GATHER_ROWS, BLOCK_D=block_d(D), num_warps=4)
    return kept_prev, kept_cur


def merge_triton(x_prev: torch.Tensor, x_cur: torch.Tensor, t: float, gamma: float,
                 magnitude: str, d_range=None, mask=None, keep=None) -> MergedPair:
    """Launch pass 1, mark, gather. Arguments are validated by `minitriton.merge`."""
    B, H, S, D = x_prev.shape
    dev = x_prev.device
    e = torch.empty((B, H, S, D), dtype=x_prev.dtype, device=dev)
    mag_p = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    mag_c = torch.empty_like(mag_p)
    d = torch.empty_like(mag_p)
    d_min = torch.full((B, H), 2.0, dtype=torch.float32, device=dev)
    d_max = torch.full((B, H), -1.0, dtype=torch.float32, device=dev)
    if S > 0 and B * H > 0:
        for b in batch_chunks(B, H):
            grid = lambda meta, nb=b.stop - b.start: (  # noqa: E731
                triton.cdiv(S, meta["BLOCK_S"]), H, nb)
            _merge_autotuned[grid](
                x_prev[b], x_cur[b], e[b], mag_p[b], mag_c[b], d[b], d_min[b], d_max[b],
                H, S, D, *x_prev.stride(), *x_cur.stride(), t,
                PROJECTION=magnitude == "projection", BLOCK_D=block_d(D))
    return finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                        d_range, lambda thr, bound, mask, keep: select_retained_triton(
                            x_prev, x_cur, e, mag_p, mag_c, d, thr, bound, mask, keep),
                        counted_extremes_triton, mask=mask, keep=keep)


def aot_specs() -> list:
    """Every kernel and config the launchers can run, for ahead-of-time compile checks.

    D is a runtime argument, so a compiled kernel depends on BLOCK_D (the power of two covering
    D), not on D itself: every pruned autotune config at every BLOCK_D in 16..256 for bfloat16
    and float32 (the PROJECTION variant, which keeps more live), the "norm" variant at
    BLOCK_D = 128, and float16 (the same code as bfloat16 but the load's conversion) at 128."""
    specs = []
    strides = {f"s{w}_{a}": "i64" for w in "pc" for a in "bhsd"}
    plan = [(dt, bd, True) for dt in ("bf16", "fp32") for bd in (16, 32, 64, 128, 256)]
    plan += [(dt, 128, False) for dt in ("bf16", "fp32")] + [("fp16", 128, True)]
    for dt, bd, proj in plan:
        sig = {"xp_ptr": f"*{dt}", "xc_ptr": f"*{dt}", "e_ptr": f"*{dt}",
               "magp_ptr": "*fp32", "magc_ptr": "*fp32", "d_ptr": "*fp32",
               "dmin_ptr": "*fp32", "dmax_ptr": "*fp32", "H": "i32", "S": "i32",
               "D": "i32", **strides, "t": "fp32", "PROJECTION": "constexpr",
               "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
        for cfg in _prune(token_tile_configs(), {}, BLOCK_D=bd):
            bs = cfg.kwargs["BLOCK_S"]
            specs.append((f"merge[{dt},BD={bd},proj={int(proj)},BS={bs},w={cfg.num_warps}]",
                          _merge_kernel, sig, {"PROJECTION": proj, "BLOCK_S": bs, "BLOCK_D": bd},
                          cfg.num_warps, cfg.num_stages))
    for dt in ("fp16", "bf16", "fp32"):
        for bd in (16, 128, 256):
            sig = {"xp_ptr": f"*{dt}", "xc_ptr": f"*{dt}", "idx_ptr": "*i64", "kp_ptr": f"*{dt}",
                   "kc_ptr": f"*{dt}", "e_ptr": f"*{dt}", "magp_ptr": "*fp32",
                   "magc_ptr": "*fp32", "d_ptr": "*fp32", "N": "i32", "H": "i32", "S": "i32",
                   "D": "i32",
                   **strides, "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
            specs.append((f"gather[{dt},BD={bd}]", _gather_kernel, sig,
                          {"BLOCK_R": GATHER_ROWS, "BLOCK_D": bd}, 4, 3))
    sig = {"d_ptr": "*fp32", "thr_ptr": "*fp32", "magp_ptr": "*fp32", "magc_ptr": "*fp32",
           "mask_ptr": "*u8", "keep_ptr": "*u8", "flag_ptr": "*i8", "count_ptr": "*i32",
           "H": "i32", "S": "i32", "n_tiles": "i32", "sm_b": "i32", "sm_s": "i32",
           "sk_b": "i32", "sk_s": "i32", "MAG_MAX": "fp32", "RANGE_RULE": "constexpr",
           "HAS_MASK": "constexpr", "HAS_KEEP": "constexpr", "BLOCK_S": "constexpr"}
    for flags in range(8):
        rule, mask, keep = bool(flags & 4), bool(flags & 2), bool(flags & 1)
        specs.append((f"mark[range={int(rule)},mask={int(mask)},keep={int(keep)}]", _mark_kernel,
                      sig, {"RANGE_RULE": rule, "HAS_MASK": mask, "HAS_KEEP": keep,
                            "BLOCK_S": MARK_TOKENS}, 4, 3))
    sig = {"d_ptr": "*fp32", "mask_ptr": "*u8", "keep_ptr": "*u8", "dmin_ptr": "*fp32",
           "dmax_ptr": "*fp32", "H": "i32", "S": "i32", "n_tiles": "i32", "sm_b": "i32",
           "sm_s": "i32", "sk_b": "i32", "sk_s": "i32", "HAS_MASK": "constexpr",
           "HAS_KEEP": "constexpr", "BLOCK_S": "constexpr"}
    for mask, keep in ((True, False), (False, True), (True, True)):
        specs.append((f"extremes[mask={int(mask)},keep={int(keep)}]", _extremes_kernel, sig,
                      {"HAS_MASK": mask, "HAS_KEEP": keep, "BLOCK_S": MARK_TOKENS}, 4, 3))
    sig = {"flag_ptr": "*i8", "start_ptr": "*i64", "slot_ptr": "*i32", "idx_ptr": "*i64",
           "S": "i32", "n_tiles": "i32", "BLOCK_S": "constexpr"}
    specs.append(("number", _number_kernel, sig, {"BLOCK_S": MARK_TOKENS}, 4, 3))
    return specs


__all__ = ["merge_triton", "counted_extremes_triton", "select_retained_triton",
           "gather_retained_triton", "aot_specs"]
