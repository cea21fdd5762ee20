"""`decode_attention`: one decode step of attention over a MiniCache-compressed layer.

Validates the arguments, then dispatches to the Triton kernels (`minitriton.kernels.decode`,
CUDA tensors or TRITON_INTERPRET=1) or to the torch path (`minitriton.torch_decode`).
"""

from __future__ import annotations

import math

import torch

from ._checks import (check_bool, check_has_data, check_head_dim, check_int, check_real,
                      check_same, check_tensor, plain)
from .backend import on_device, select_backend
from .pair import MergedPair, check_pair, resolve_neg
from .reference import FLOAT32_MAX


LAYERS = ("prev", "cur")


def decode_attention(q: torch.Tensor, k: MergedPair, v: MergedPair, *, layer: str,
                     k_tail: torch.Tensor | None = None, v_tail: torch.Tensor | None = None,
                     seq_lens: torch.Tensor | None = None, tail_lens: torch.Tensor | None = None,
                     sm_scale: float | None = None, return_lse: bool = False,
                     num_splits: int | None = None, seq_starts: torch.Tensor | None = None):
    """Softmax attention of one query token per sequence over a merged layer, then a tail.

    The keys/values of layer `layer` ("prev" = layer l-1, "cur" = layer l) of a merged pair are
    used as `restore` would give them (mag * e, retained tokens as they were), but the restored
    cache is never built: for a merged token q . k_j = mag_j (q . e_j), the value sum gathers
    mag_j e_j, and retained tokens read their rows of the retained store. The sequence of row b
    is its merged tokens from `seq_starts[b]` up to `seq_lens[b]`, followed by the first
    `tail_lens[b]` tail tokens.

    Args:
        q: `[B, Hq, D]` float16/bfloat16/float32, any strides. Hq = G * H: query head i reads
            KV head i // G (grouped-query attention; G = 1 is plain multi-head attention).
        k, v: `MergedPair`s of the keys and of the values of one layer pair, both of shape
            `[B, H, S, D]` and q's dtype and device. `magnitude="projection"` pairs work as is.
        layer: "prev" or "cur", which layer of the pair to attend over.
        k_tail, v_tail: optional uncompressed tail `[B, H, T, D]` (both or neither, same shape,
            q's dtype and device, any strides), e.g. the tokens since the last merge.
        seq_lens: optional int32 `[B]` on q's device, values in [0, S]; default S for all rows.
        tail_lens: optional int32 `[B]` on q's device, values in [0, T]; default T.
        seq_starts: optional int32 `[B]` on q's device, values in [0, S]; default 0: row b's
            merged tokens before it are skipped (e.g. the padding of a left-padded batch). A
            start at or past the row's length leaves it no merged token.
        sm_scale: softmax scale, a finite number within float32's range (a one-element
            tensor is read on the host: keep it on the CPU when capturing a CUDA graph);
            default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores.
        num_splits: Triton path only: split the token axis over this many programs per KV head
            (1 to 1024; more splits than blocks is allowed and only wastes a little). Default: a
            heuristic from B, H, S + T and the GPU's multiprocessor count. Checked on both
            backends (the same call is valid on each), then ignored by the torch path.

    Returns:
        o `[B, Hq, D]` in q's dtype; with return_lse, `(o, lse)` with lse float32 `[B, Hq]`, the
        natural log of the softmax denominator of the scaled scores (to combine this attention
        with attention over other segments). A row with no token at all (seq_len = tail_len = 0)
        gives o = 0 and lse = -inf; a key with a NaN component (merge retains such tokens)
        makes its row's o and lse NaN, as in attention over the dense layer. Tokens past the
        lengths never reach the output, whatever they hold. A float16/bfloat16
        o is clamped to the dtype's finite range (NaN stays NaN), as `restore` is: values
        beyond it saturate, not become inf.

    Lengths and starts are checked against [0, S] / [0, T] when they live on the CPU. On CUDA
    that check would need a host synchronisation, so it is not made there; instead the kernels
    clamp each length and start into its range, so an out-of-range value never reads outside
    the cache. The `slot` values of a hand-built MergedPair are likewise checked only on the
    CPU (see `restore`).

    Not differentiable (an inference kernel): no output requires grad; the transformers
    integration attends through restore + sdpa when a step needs gradients.

    CUDA graphs: the Triton path makes no host synchronisation (no .item(), no nonzero, no
    shape that depends on data) and allocates its outputs and float32 partials before the
    launches, so a call can be captured in a CUDA graph and replayed; the lengths are read from
    their tensors at replay, so update `seq_lens`/`tail_lens`/`seq_starts` in place between
    replays. Pass `num_splits` (or keep S + T fixed) to keep the launch geometry that was
    captured. Run the same call once before capturing it (same dtypes, head dim, layouts, tail
    and `seq_starts` given or not): the first launch of each kernel variant compiles and loads
    it, which a capture does not allow.

    Example:
        >>> k_m = minitriton.merge(k_prev, k_cur)          # [B, H, S, D] keys of layers l-1, l
        >>> v_m = minitriton.merge(v_prev, v_cur)
        >>> o = minitriton.decode_attention(q, k_m, v_m, layer="cur", k_tail=k_new,
        ...                                 v_tail=v_new)  # q [B, Hq, D] -> o [B, Hq, D]
    """
    q, k_tail, v_tail, seq_lens, tail_lens, scale, num_splits = _check_args(
        q, k, v, layer, k_tail, v_tail, seq_lens, tail_lens, sm_scale, return_lse, num_splits)
    _check_lengths("seq_starts", seq_starts, q.shape[0], k.shape[2], "S", q.device)
    # Views with torch's lazy negation bit hold -x in their storage, which the kernels read.
    # Tensor subclasses are read as plain tensors (the output is plain on every backend).
    q, k, v = plain(q.resolve_neg()), resolve_neg(k), resolve_neg(v)
    k_tail, v_tail = (None if x is None else plain(x.resolve_neg()) for x in (k_tail, v_tail))
    with torch.no_grad():   # not differentiable, on both backends
        if select_backend(q.device) == "triton":
            from .kernels.decode import decode_attention_triton
            with on_device(q.device):
                o, lse = decode_attention_triton(q, k, v, layer, k_tail, v_tail, seq_lens,
                                                 tail_lens, scale, num_splits,
                                                 seq_starts=seq_starts)
        else:
            from .torch_decode import decode_attention_torch
            o, lse = decode_attention_torch(q, k, v, layer, k_tail, v_tail, seq_lens,
                                            tail_lens, scale, seq_starts)
    return (o, lse) if return_lse else o


def _check_lengths(name: str, lens, B: int, limit: int, limit_name: str, device) -> None:
    if lens is None:
        return
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor of shape [{B}], "
                        f"got {type(lens).__name__}")
    if lens.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype int32, got {lens.dtype}")
    if tuple(lens.shape) != (B,):
        raise ValueError(f"{name}: expected shape ({B},), got {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{name}: device {lens.device} does not match q's {device}")
    if lens.device.type == "cpu" and B:  # a free check on the CPU; on CUDA it would synchronise
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name}: values must lie in [0, {limit_name}={limit}], got "
                             f"min {lo}, max {hi}")


def _check_args(q, k, v, layer, k_tail, v_tail, seq_lens, tail_lens, sm_scale, return_lse,
                num_splits):
    check_tensor("q", q, ndim=3)
    check_pair("k", k)
    check_pair("v", v)
    if not isinstance(layer, str) or layer not in LAYERS:
        raise ValueError(f"layer: expected one of {LAYERS}, got {layer!r}")
    if k.shape != v.shape:
        raise ValueError(f"v: MergedPair shape {v.shape} does not match k's {k.shape}")
    B, Hq, D = q.shape
    Bk, H, S, Dk = k.shape
    for name, m in (("k", k), ("v", v)):
        if m.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {m.dtype} does not match q's {q.dtype}")
        if m.device != q.device:
            raise ValueError(f"{name}: device {m.device} does not match q's {q.device}")
    check_has_data("q", q)
    if Bk != B:
        raise ValueError(f"k: batch {Bk} does not match q's batch {B} (q shape {tuple(q.shape)})")
    if Dk != D:
        raise ValueError(f"k: head dim {Dk} does not match q's head dim {D}")
    check_head_dim("q", D)
    if H == 0:
        raise ValueError(f"k: a pair of H=0 KV heads has no query groups (q has Hq={Hq} heads; "
                         f"each KV head serves Hq / H of them)")
    if Hq % H != 0:
        raise ValueError(f"q: number of query heads Hq={Hq} is not a multiple of the number of "
                         f"KV heads H={H}")

    if (k_tail is None) != (v_tail is None):
        given = "k_tail" if k_tail is not None else "v_tail"
        raise ValueError(f"{given}: a tail was given for one of k/v only; pass both k_tail and "
                         f"v_tail, or neither")
    T = 0
    if k_tail is not None:
        check_tensor("k_tail", k_tail, ndim=4)
        check_tensor("v_tail", v_tail, ndim=4)
        check_same("v_tail", v_tail, "k_tail", k_tail)
        check_same("k_tail", k_tail, "q", q, shape=False)
        Bt, Ht, T, Dt = k_tail.shape
        if (Bt, Ht, Dt) != (B, H, D):
            raise ValueError(f"k_tail: shape {tuple(k_tail.shape)} does not match [B={B}, H={H}, "
                             f"T, D={D}]")
    elif tail_lens is not None:
        raise ValueError("tail_lens: given without k_tail/v_tail")
    _check_lengths("seq_lens", seq_lens, B, S, "S", q.device)
    _check_lengths("tail_lens", tail_lens, B, T, "T", q.device)

    if sm_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = check_real("sm_scale", sm_scale)
        if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:   # (scores are float32)
            raise ValueError(f"sm_scale: expected a finite float32 number, got {scale!r}")
    check_bool("return_lse", return_lse)
    if num_splits is not None:
        num_splits = check_int("num_splits", num_splits, "an int or None")
        from .kernels.decode import MAX_SPLITS
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits: expected a value in [1, {MAX_SPLITS}], "
                             f"got {num_splits}")
    if k_tail is not None and T == 0:
        k_tail = v_tail = tail_lens = None  # an empty tail is no tail
    return q, k_tail, v_tail, seq_lens, tail_lens, scale, num_splits
