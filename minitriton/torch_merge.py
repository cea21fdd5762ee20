"""The torch path of merge and restore: the same contract as the Triton kernels, in vectorised
torch ops, for CPU tensors (and any device with MINITRITON_BACKEND=torch).

Merge makes two passes over the inputs, chunk by chunk: the per-token reductions (two norms and
the dot product), then e = a x_prev + b x_cur; in between, the per-token scalar work runs once
over `[B, H, S]`. Two identities avoid further passes:

    |e|^2 = w_p^2 + w_c^2 + 2 w_p w_c cos(Omega)     (no pass over e to renormalise it)
    x_prev . e = a |x_prev|^2 + b (x_prev . x_cur)     (projection magnitudes without a pass)

On a CPU the passes go chunk by chunk (1 MiB of both inputs per thread), through one reused
float32 scratch chunk (the products for the dot; float32 copies of float16/bfloat16 inputs):
no full-size temporaries, and no fresh memory to fault in but e's.
"""

from __future__ import annotations

import math

import torch

from ._upcast import chunked, upcast_chunks
from .pair import MergedPair, _layer_parts, _slots_from_mask
from .reference import FLOAT32_MAX, LERP_EPS, MIN_NORMAL, SIN_EPS
from .retention import counted_extremes_torch, finish_merge, retained_mask

# arccos of a rounded cosine (float32 dot over float32 norms, ~1e-6 relative) is off by up to
# ~sqrt(2e-6) near 0 and pi, where SLERP's weights are ill conditioned. Tokens whose angle is
# within _REFINE_NEAR of 0, or whose cosine is below _COS_FAR (Omega above ~154 degrees), get it
# again from 2 atan2(|u_p - u_c|, |u_p + u_c|), exact there (the kernels' formula). Below
# _COS_FAR e and the projections are computed from the vectors too (see `_far_tokens`); above
# it the closed forms lose at most ~20 ulp to cancellation. Such tokens are rare, so only they
# are read again.
_REFINE_NEAR = 1e-2
_COS_NEAR = math.cos(_REFINE_NEAR)
_COS_FAR = -0.9
# cos outside [_COS_FAR, _COS_NEAR] <=> |cos - _MID| > _HALF (one full-size test)
_MID, _HALF = (_COS_NEAR + _COS_FAR) / 2, (_COS_NEAR - _COS_FAR) / 2

# Tokens per chunk: 2 inputs x float32 x tokens x D = 1 MiB per thread of torch's pool (at most
# 16 MiB), so that each thread's share of a chunk of both inputs and of the scratch (or of e)
# stays in its core's L2 between the ops that read it again. Measured on 2 cores with 2 MiB of
# L2 each: with one thread, 2 MiB chunks are 7% (float32) to 13% (bfloat16) slower than 1 MiB;
# with two, 2 MiB and 4 MiB are within noise of each other; 256-512 KiB a thread is slower
# (per-op overhead).
_CHUNK_BYTES_PER_THREAD = 1 << 20
_MAX_CHUNK_BYTES = 1 << 24


def _refine_angles(omega, cos, x_prev, x_cur, inv_p, inv_c) -> None:
    """Recompute, in place, the angle (and its cosine) of the tokens near 0 or far from it
    (cos < _COS_FAR) from their directions. (A zero vector has cosine 0 with anything.)"""
    idx = torch.nonzero((cos - _MID).abs_() > _HALF, as_tuple=True)
    if idx[0].numel():
        u_p = x_prev[idx].float() * inv_p[idx].unsqueeze(-1)
        u_c = x_cur[idx].float() * inv_c[idx].unsqueeze(-1)
        omega[idx] = 2.0 * torch.atan2(torch.linalg.vector_norm(u_p - u_c, dim=-1),
                                       torch.linalg.vector_norm(u_p + u_c, dim=-1))
        cos[idx] = torch.cos(omega[idx])


# Below this norm the squares and products of a token's components may underflow float32
# (components under ~1e-19), or all of them may have (its norm is then 0): its norm and cosine
# are recomputed from scaled vectors.
_TINY = 2.0 ** -50


def _rescue(n_p, n_c, dot, x_prev, x_cur):
    """Tokens whose norms or dot overflowed float32 (|x| above ~1.8e19), or with a norm below
    _TINY (zero vectors included), whose squares and products may have underflowed: their
    norms again, in place, from the vectors scaled by their largest component, and their
    cosine, as (index, cos); None when there are none (always, for KV states). Only they are
    read again. A vector shorter than float32's smallest normal number (MIN_NORMAL) counts as
    a zero vector, as in the kernel and the reference."""
    # One sum and one minimum first: the sum is finite when every term is (bar an overflow of
    # the sum itself, which only costs the full test below).
    total, low = torch.stack((n_p.sum() + n_c.sum() + dot.sum(),
                              torch.minimum(n_p.amin(), n_c.amin()) if n_p.numel()
                              else n_p.new_ones(()))).tolist()
    tiny = not low >= _TINY                       # (NaN: look)
    if math.isfinite(total) and not tiny:
        return None
    rescue = ~torch.isfinite(n_p + n_c + dot)
    if tiny:
        for n in (n_p, n_c):
            rescue |= n < _TINY
    big = torch.nonzero(rescue, as_tuple=True)
    if not big[0].numel():
        return None
    units = []
    for x, n in ((x_prev, n_p), (x_cur, n_c)):
        rows = x[big].float()
        top = rows.abs().amax(-1, keepdim=True)
        rows = rows / torch.where(top > 0, top, 1.0)
        norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        length = top * norm
        norm = torch.where(length < MIN_NORMAL, 0.0, norm)      # (NaN stays NaN)
        # (NaN for a vector longer than float32's largest number: it has no magnitude to
        # store, and so, as one with a NaN or inf component, no angle)
        n[big] = (top * norm)[:, 0].nan_to_num(nan=math.nan, posinf=math.nan)
        units.append(rows * torch.where(norm > 0, 1.0 / norm, 0.0))
    dot[big] = 0.0   # unused for these tokens: the cosine is given, projections use the vectors
    return big, (units[0] * units[1]).sum(-1).clamp_(-1.0, 1.0)


def _slerp_coefficients(n_p, n_c, dot, t: float, x_prev, x_cur, big=None):
    """Per-token scalars (a, b, d) such that e = a x_prev + b x_cur is the unit SLERP direction
    and d = Omega / pi, all float32 `[...]`; and the tokens whose e is computed from their
    vectors instead (what `_far_tokens` returns).

    This runs once over every token, so it is written as few full-size ops as it can be: no
    boolean masks or `where` over all tokens (they cost several float ops each), only over the
    rare tokens whose sin(Omega) is below SIN_EPS (the linear interpolation's weights) or whose
    interpolation is zero. Whether there are any is read first from the extremes of the cosines
    and norms (four reductions), so that inputs without them pay for no comparisons:
      - sin(Omega) < SIN_EPS only for refined tokens (any other Omega is in [_REFINE_NEAR,
        arccos(_COS_FAR)], where sin(Omega) > 0.0099);
      - |e| < LERP_EPS only for far tokens or a zero partner (elsewhere cos >= _COS_FAR and a
        weight >= 1/2 give |e|^2 >= 0.1 * 1/4)."""
    inv_p = torch.reciprocal(n_p).nan_to_num_(posinf=0.0)           # direction 0 for x = 0
    inv_c = torch.reciprocal(n_c).nan_to_num_(posinf=0.0)
    cos = (dot * inv_p).mul_(inv_c).clamp_(-1.0, 1.0)                # 0 when either is zero
    if big is not None:
        cos[big[0]] = big[1]
    omega = torch.arccos(cos)
    extremes = torch.stack((cos.amin(), cos.amax(), n_p.amin(), n_c.amin())) if cos.numel() \
        else torch.tensor((0.0, 0.0, 1.0, 1.0))
    lo, hi, min_p, min_c = extremes.tolist()
    # (Written so that a NaN anywhere, which the extremes propagate, takes the full path.)
    far_any = not lo >= _COS_FAR                 # some nearly antiparallel tokens
    edge = far_any or not hi <= _COS_NEAR        # some tokens to refine
    zeros = not (min_p > 0.0 and min_c > 0.0)    # some zero vectors
    if edge:
        _refine_angles(omega, cos, x_prev, x_cur, inv_p, inv_c)
    sin = torch.sin(omega)
    inv_sin = (sin.clamp(min=SIN_EPS) if edge else sin).reciprocal_()   # (sin itself if not)
    w_p = torch.mul(omega, 1.0 - t).sin_().mul_(inv_sin)
    w_c = torch.mul(omega, t).sin_().mul_(inv_sin)
    if zeros:   # only non-zero directions contribute (sign(|x|) is 1 or 0)
        w_p.mul_(torch.sign(n_p))
        w_c.mul_(torch.sign(n_c))
    if edge:
        lin = torch.nonzero(sin < SIN_EPS, as_tuple=True)   # (sin >= 0 up to rounding at pi)
        if lin[0].numel():   # the linear interpolation's (1 - t, t), for non-zero directions
            w_p[lin] = (1.0 - t) * torch.sign(n_p[lin])
            w_c[lin] = t * torch.sign(n_c[lin])
    # (inv_sin's buffer is free from here on; each fresh buffer costs page faults)
    n_e = (w_p * w_p).addcmul_(w_c, w_c).addcmul_(torch.mul(w_p, w_c, out=inv_sin), cos,
                                                  value=2.0)
    n_e.clamp_(min=0.0).sqrt_()
    far = None
    if far_any or big is not None:   # (before n_e is used)
        far = _far_tokens(cos, w_p, w_c, inv_p, inv_c, x_prev, x_cur,
                          None if big is None else big[0])
    # No direction in between (antiparallel at t = 0.5, or a zero partner at t = 0 or 1): take
    # u_c, or u_p when x_cur is zero.
    deg = torch.nonzero(n_e < LERP_EPS, as_tuple=True) if far is not None or zeros else None
    if deg is not None and deg[0].numel():
        has_c = torch.sign(n_c[deg])
        w_c[deg] = has_c
        w_p[deg] = (1.0 - has_c) * torch.sign(n_p[deg])
        n_e[deg] = w_p[deg] + w_c[deg]
    inv_e = n_e.reciprocal_().nan_to_num_(posinf=0.0)
    return (w_p.mul_(inv_p).mul_(inv_e), w_c.mul_(inv_c).mul_(inv_e),
            omega.mul_(1.0 / math.pi), far)


def _far_tokens(cos, w_p, w_c, inv_p, inv_c, x_prev, x_cur, also=None):
    """e of the nearly antiparallel tokens (and of the tokens `also`: those whose squares
    overflowed or may have underflowed, see `_rescue`), from their vectors, with their
    projections x . e: (index, float32 e rows, x_prev . e, x_cur . e), or None.

    Near Omega = pi, |e|^2 = w_p^2 + w_c^2 + 2 w_p w_c cos(Omega) cancels (the weights grow
    like 1 / sin(Omega) while |e| stays 1), and so does x . e = a |x|^2 + b (x_prev . x_cur).
    For these tokens e is computed as the kernels do: w_p u_p + w_c u_c from the vectors,
    divided by its own norm (or, when that is below LERP_EPS, u_c, or u_p when x_cur is zero).
    They are rare in real caches, so only they are read again."""
    far = cos < _COS_FAR
    if also is not None:
        far[also] = True
    idx = torch.nonzero(far, as_tuple=True)
    if not idx[0].numel():
        return None
    xp, xc = x_prev[idx].float(), x_cur[idx].float()
    u_p = xp * inv_p[idx].unsqueeze(-1)
    u_c = xc * inv_c[idx].unsqueeze(-1)
    e = u_p * w_p[idx].unsqueeze(-1) + u_c * w_c[idx].unsqueeze(-1)
    n_e = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    # No direction in between: u_c, or u_p when x_cur is zero (a huge x_prev next to a zero
    # x_cur at t ~ 1 lands here); 0 when both are.
    deg = n_e < LERP_EPS
    fallback = torch.where(inv_c[idx].unsqueeze(-1) > 0, u_c, u_p)
    n_fb = torch.linalg.vector_norm(fallback, dim=-1, keepdim=True)
    e = torch.where(deg, fallback, e) / torch.where(deg, n_fb, n_e).clamp(min=LERP_EPS)
    return idx, e, (xp * e).sum(-1), (xc * e).sum(-1)


def merge_torch(x_prev: torch.Tensor, x_cur: torch.Tensor, t: float, gamma: float,
                magnitude: str, d_range=None, mask=None, keep=None) -> MergedPair:
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
    xp_v, xc_v, step = _token_views(x_prev, x_cur, dev.type == "cpu")
    axis = xp_v.dim() - 2    # the token axis of the views

    def pieces(y):   # chunk views of a `[B, H, S, ...]` tensor, made by one call
        return _like_view(y, xp_v).split(step, axis)

    # One float32 scratch chunk, reused: the products x_prev * x_cur (summed into the dot) and,
    # for float16/bfloat16 inputs, the float32 copies. Reused memory stays in cache and is not
    # faulted in again chunk after chunk, as a fresh temporary per op would be.
    # Inputs strided along D are copied too: a row reduction over strided memory rounds in
    # another order, and the results would then depend (by an ulp) on the inputs' layout.
    xp_c, xc_c = xp_v.split(step, axis), xc_v.split(step, axis)
    direct = x_prev.dtype == torch.float32 and x_prev.stride(3) == 1 and x_cur.stride(3) == 1
    scratch = [torch.empty(xp_c[0].shape, dtype=torch.float32, device=dev)   # (the largest)
               for _ in range(1 if direct else 3)]
    for xp_i, xc_i, n_p_i, n_c_i, dot_i in zip(xp_c, xc_c, *map(pieces, (n_p, n_c, dot))):
        k = xp_i.shape[axis]
        prod = scratch[0].narrow(axis, 0, k)
        if direct:
            xp32, xc32 = xp_i, xc_i
        else:
            xp32 = scratch[1].narrow(axis, 0, k).copy_(xp_i)
            xc32 = scratch[2].narrow(axis, 0, k).copy_(xc_i)
        # The product first: one op streams both inputs in, the norms then read them from
        # cache. The dot sums the contiguous product.
        torch.mul(xp32, xc32, out=prod)
        torch.linalg.vector_norm(xp32, dim=-1, out=n_p_i)
        torch.linalg.vector_norm(xc32, dim=-1, out=n_c_i)
        torch.sum(prod, dim=-1, out=dot_i)
    big = _rescue(n_p, n_c, dot, x_prev, x_cur)
    a, b, d, far = _slerp_coefficients(n_p, n_c, dot, t, x_prev, x_cur, big)
    for xp_i, xc_i, e_i, a_i, b_i in zip(xp_c, xc_c, *map(pieces, (e, a.unsqueeze(-1),
                                                                 b.unsqueeze(-1)))):
        if e.dtype == torch.float32:      # write e in place: no float32 copy to cast from
            torch.mul(xp_i, a_i, out=e_i)
            e_i.addcmul_(xc_i, b_i)
        else:   # float32 arithmetic on float32 copies in the reused scratch (a mixed-dtype op
            # would make a fresh float32 copy of its input), then one cast into e
            k = xp_i.shape[axis]
            xp32 = scratch[1].narrow(axis, 0, k).copy_(xp_i)
            xc32 = scratch[2].narrow(axis, 0, k).copy_(xc_i)
            xp32.mul_(a_i).addcmul_(xc32, b_i)
            e_i.copy_(xp32)
    if far is not None:
        e[far[0]] = far[1].to(e.dtype)
    # Tokens with a NaN or inf component, or longer than float32's largest number (their norms
    # are NaN after `_rescue`, which every non-finite norm goes through), have no angle:
    # d = NaN retains them, their e and magnitudes are 0, and they stay out of the row's
    # extremes.
    no_angle = None if big is None else torch.nonzero(n_p.isnan() | n_c.isnan(), as_tuple=True)
    if magnitude == "norm":
        mag_p, mag_c = n_p, n_c
    else:  # x . e with e = a x_prev + b x_cur, evaluated on the float32 e (before the cast)
        mag_p, mag_c = a * n_p * n_p + b * dot, a * dot + b * n_c * n_c
        if far is not None:   # (|x . e| <= |x|, but the sum may round past float32's range)
            mag_p[far[0]] = far[2].clamp(-FLOAT32_MAX, FLOAT32_MAX)
            mag_c[far[0]] = far[3].clamp(-FLOAT32_MAX, FLOAT32_MAX)
    if no_angle is not None and no_angle[0].numel():
        e[no_angle] = 0
        mag_p[no_angle], mag_c[no_angle], d[no_angle] = 0.0, 0.0, math.nan
        d_min, d_max = d.nan_to_num(2.0).amin(dim=-1), d.nan_to_num(-1.0).amax(dim=-1)
    elif S:
        d_min, d_max = d.amin(dim=-1), d.amax(dim=-1)
    else:   # an empty row: the extremes of nothing (what the kernel's atomics start from)
        d_min, d_max = counted_extremes_torch(d, None, None)

    def select(thr, bound, mask, keep):
        retained = retained_mask(d, thr, mag_p, mag_c, magnitude, bound, mask, keep)
        return (_slots_from_mask(retained), *gather_retained_torch(x_prev, x_cur, retained))

    return finish_merge(x_prev, x_cur, e, mag_p, mag_c, d, d_min, d_max, t, gamma, magnitude,
                        d_range, select, counted_extremes_torch, mask=mask, keep=keep)


def _token_views(x_prev, x_cur, chunked: bool):
    """Views of the inputs to cut into chunks of tokens, and the tokens (rows) per chunk.

    Inputs whose (b, h, s) dims flatten without a copy are seen as `[B*H*S, D]` and cut into
    contiguous row ranges; others (e.g. a `[B, S, H, D]` buffer seen as `[B, H, S, D]`) stay
    4-d and are cut along S."""
    B, H, S, D = x_prev.shape
    try:
        views = (x_prev.view(-1, D), x_cur.view(-1, D))
        n, tokens_per_index = B * H * S, 1
    except RuntimeError:
        views, n, tokens_per_index = (x_prev, x_cur), S, B * H
    step = n if not chunked else _chunk_bytes() // (8 * D * tokens_per_index)
    return views[0], views[1], max(1, step)


def _chunk_bytes() -> int:
    """Bytes of both inputs (as float32) per chunk: 1 MiB per thread of torch's pool, at most
    16 MiB (read at every call: torch's thread count may change)."""
    return min(_MAX_CHUNK_BYTES, _CHUNK_BYTES_PER_THREAD * max(1, torch.get_num_threads()))


def _like_view(y, ref_view):
    """y (`[B, H, S, ...]`, contiguous) seen with the token layout of `ref_view`."""
    return y.view(-1, *y.shape[3:]) if ref_view.dim() == 2 else y


def saturate(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y (float32) clamped in place to the finite range of `dtype` when that is float16 or
    bfloat16 (NaN stays NaN): a value beyond it saturates instead of rounding to inf. (A float32
    intermediate that overflowed to inf, e.g. a decode accumulator over values near float32's
    limit, saturates too, as does an inf that came in with the input.)"""
    if dtype != torch.float32:
        bound = torch.finfo(dtype).max
        y.clamp_(-bound, bound)
    return y


def gather_retained_torch(x_prev, x_cur, retained):
    """The retained tokens' originals, `[N, D]` each, rows in (b, h, s) order (index_select on
    a `[B*H*S, D]` view when the inputs flatten, else advanced indexing; never a full copy)."""
    B, H, S, D = x_prev.shape
    idx = torch.nonzero(retained.reshape(-1)).reshape(-1)
    out = []
    for x in (x_prev, x_cur):
        try:
            out.append(x.view(-1, D).index_select(0, idx))
        except RuntimeError:
            out.append(x[idx // (H * S), (idx // S) % H, idx % S])
    return out[0], out[1]


def restore_torch(m: MergedPair, layer=None):
    """See `minitriton.restore`. mag * e in float32 (saturated to a half dtype's range), rounded
    once to the dtype; e is upcast once for both layers (on a CPU, a half-precision e chunk by
    chunk through a reused float32 buffer)."""
    layers = ("prev", "cur") if layer is None else (layer,)
    mags = [_layer_parts(m, name)[0].unsqueeze(-1) for name in layers]
    if chunked(m.e):
        outs = [torch.empty(m.shape, dtype=m.dtype, device=m.device) for _ in layers]
        for sl, e32 in upcast_chunks(m.e):
            for x, mag in zip(outs, mags):
                x[:, :, sl] = saturate(e32 * mag[:, :, sl], m.dtype)
    else:
        e32 = m.e.float()
        outs = [saturate(e32 * mag, m.dtype).to(m.dtype) for mag in mags]
    if m.num_retained:
        retained = m.retained
        for x, name in zip(outs, layers):
            x[retained] = _layer_parts(m, name)[1]
    return tuple(outs) if layer is None else outs[0]
