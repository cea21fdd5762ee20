"""A MiniCache KV cache, independent of any model framework.

The cache holds, for every layer of a model, the key and value states `[B, H, S, D]` of the
tokens seen so far. Layers named in a `MergePlan` are stored in adjacent pairs (l-1, l):

    sink   the first `sink` tokens of each layer, dense (never merged)
    store  the merged tokens: one `MergedPair` for the keys and one for the values of both layers
           (or, for the "mean" baseline, one dense average per pair)
    tail   the newest tokens of each layer, dense, not yet merged

and `get(layer)` returns `sink + restore(store)[layer] + tail`, in order: no token is ever lost
and the sequence length is exact. Other layers are stored densely.

When merges happen:
- Prefill. The first states of a pair arrive layer by layer (prev, then cur). The prev layer's
  states are held until the cur layer's arrive; then both are merged as ONE chunk (retention over
  the whole prompt) and no dense copy is kept. The states returned to the model for that forward
  are the exact inputs: a prompt attends to itself at full precision, and merging only changes
  what later tokens see (as in the paper).
- Decode. Later tokens go to each layer's tail. At the start of a forward (the prev layer's
  update), whole chunks of `window` (W) tokens are moved from the tails into the store, oldest
  first; the tokens of the current forward are therefore always attended at full precision, and
  a multi-token forward (a prefill chunk, scoring) appends all its tokens to the tail.
  W = 1 merges every token at the next step: the paper's per-token merging.

Chunk retention rule. A chunk is merged with `merge(..., d_range=(old.d_min, old.d_max))` and
appended with `MergedPair.cat`: a token of the new chunk is retained iff its angular distance
`d > d_max - (d_max - d_min) * gamma`, where d_min / d_max are the extremes over every token of
that (b, h) row merged so far INCLUDING the new chunk. Tokens merged earlier keep their decision
(they are never re-merged); so with W = 1 each token is compared with the extremes of the tokens
before it, and the result depends only on the token sequence, the prompt length and W, not on
how the later tokens were grouped into forwards.

Padding. `set_attention_mask(mask)` tells the cache which positions hold padding (a `[B, L]`
mask, 0 for padding, as transformers' attention mask of a left-padded batch): merges then leave
padding out of each row's extremes and never retain it (`merge(..., mask=)`). A sink takes each
row's first positions, padding included: a padded row's own first `sink` tokens that fall past
them are kept as they are in the store (`merge(..., keep=)`: retained, out of the extremes).
With W = 1, a padded row then holds, at its tokens, exactly what it holds unpadded, sink or not
(in slerp pairs: a "mean" pair, which has no retention, averages those tokens).
Padding is still stored (merged) and counted in the bytes; the model's attention mask hides it.

Bytes: `nbytes` counts every tensor held (sinks, both stores with their retained originals,
magnitudes, slots and d extremes, tails, held prefill states). A pair's shared store is split
evenly between its two layers in the per-layer numbers. The padding mask (`set_attention_mask`,
one byte per row and position, shared by all layers) is not counted: it is the model's, held
for reference. Crops and batch edits keep no memory of the tokens or rows they cut.

Example:
    >>> cache = MiniCache(num_layers=30, window=16)            # the paper's pairs from L // 2
    >>> for layer in range(30):
    ...     k, v = cache.update(layer, k_states[layer], v_states[layer])
    >>> cache.seq_len(20), cache.compression_ratio
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ._checks import (check_dense, check_has_data, check_head_dim, check_index, check_int,
                      check_mask_dtype, check_tensor, token_mask)
from .merge import merge, restore
from .pair import MergedPair, _slots_from_mask
from .plan import DEFAULT_GAMMA, DEFAULT_T, DEFAULT_WINDOW, METHODS, MergePlan, PairSpec

__all__ = ["MiniCache", "MergePlan", "PairSpec", "DEFAULT_T", "DEFAULT_GAMMA", "DEFAULT_WINDOW",
           "METHODS"]

# ---- MergedPair row selection (crop and batch reordering) -------------------------------------
def _own(x: torch.Tensor) -> torch.Tensor:
    """x itself if its memory is all its own (as every tensor the cache stores is, in some
    layout), else a contiguous copy: a view of a cropped tensor would keep (and pickle) the
    whole of the memory it was cut from."""
    if x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _reindex(m: MergedPair, sel) -> MergedPair:
    """The MergedPair of `m` restricted to `sel`, an index into (B, S) applied as
    `x[sel_b][:, :, sel_s]`. The retained store is gathered in the new (b, h, s) order."""
    b_idx, s_sl = sel
    pick = (lambda x: _own(x[b_idx][:, :, s_sl]))
    slot = m.slot[b_idx][:, :, s_sl]
    retained = slot >= 0
    old_rows = slot[retained].long()          # row-major over the new [B, H, S]: the new order
    return replace(m, e=pick(m.e), mag_prev=pick(m.mag_prev), mag_cur=pick(m.mag_cur),
                   slot=_slots_from_mask(retained),
                   kept_prev=m.kept_prev[old_rows], kept_cur=m.kept_cur[old_rows],
                   d_min=_own(m.d_min[b_idx]), d_max=_own(m.d_max[b_idx]))


def _nb(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.numel() * x.element_size()


def _cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None or a.shape[2] == 0:
        return b
    if b is None or b.shape[2] == 0:
        return a
    return torch.cat([a, b], dim=2)


def _append(held: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """`held` followed by `new` along S, in memory of the cache's own: the caller may reuse or
    overwrite `new` afterwards (a decoder writing every layer's states into one buffer)."""
    if held is None or held.shape[2] == 0:
        return new.clone()
    return held if new.shape[2] == 0 else torch.cat([held, new], dim=2)


def _len(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else int(x.shape[2])


# ---- per-pair storage ---------------------------------------------------------------------------
class _Pair:
    """Storage of one merged pair. Lists are indexed by side: 0 = prev, 1 = cur."""

    def __init__(self, spec: PairSpec):
        self.spec = spec
        self.sink_k, self.sink_v = [None, None], [None, None]
        self.tail_k, self.tail_v = [None, None], [None, None]
        self.mk: Optional[MergedPair] = None      # slerp stores
        self.mv: Optional[MergedPair] = None
        self.mean_k: Optional[torch.Tensor] = None  # "mean" stores
        self.mean_v: Optional[torch.Tensor] = None
        self.pending = None                        # prev's first states, until cur's arrive

    def merged_len(self) -> int:
        if self.mk is not None:
            return self.mk.shape[2]
        return _len(self.mean_k)

    def seq_len(self, side: int) -> int:
        n = _len(self.sink_k[side]) + self.merged_len() + _len(self.tail_k[side])
        if side == 0 and self.pending is not None:
            n += _len(self.pending[0])
        return n

    def empty(self) -> bool:
        return self.seq_len(0) == 0 and self.seq_len(1) == 0

    # -- writes --
    def absorb(self, kp, vp, kc, vc, marks=(None, None)) -> None:
        """Sink-fill then merge a chunk of both layers' states (same length); `marks` is
        `(mask, keep)`, each bool `[B, n]` or None: the chunk's padding and the tokens kept as
        they are (see `MiniCache._chunk_marks`). Everything is computed before anything is
        stored: a failure leaves the pair as it was."""
        mask, keep = marks
        room = self.spec.sink - _len(self.sink_k[0])
        sinks = None
        if room > 0:
            n = min(room, kp.shape[2])
            sinks = [[_cat(held[side], x[:, :, :n].clone()) for side, x in enumerate(new)]
                     for held, new in ((self.sink_k, (kp, kc)), (self.sink_v, (vp, vc)))]
            kp, vp, kc, vc = (x[:, :, n:] for x in (kp, vp, kc, vc))
            mask = None if mask is None else mask[:, n:]
            keep = None if keep is None else keep[:, n:]
        stores = {}
        if kp.shape[2] and self.spec.method == "mean":
            avg = (lambda a, b: ((a.float() + b.float()) * 0.5).to(a.dtype))
            stores = dict(mean_k=_cat(self.mean_k, avg(kp, kc)),
                          mean_v=_cat(self.mean_v, avg(vp, vc)))
        elif kp.shape[2]:
            s = self.spec
            for name, (a, b) in (("mk", (kp, kc)), ("mv", (vp, vc))):
                old = getattr(self, name)
                d_range = None if old is None else (old.d_min, old.d_max)
                new = merge(a, b, s.t, s.gamma, s.magnitude, d_range=d_range, mask=mask,
                            keep=keep)
                stores[name] = new if old is None else MergedPair.cat([old, new])
        if sinks is not None:
            self.sink_k, self.sink_v = sinks
        for name, value in stores.items():
            setattr(self, name, value)

    def flush(self, window: int, chunk_marks=None) -> None:
        """Move whole `window`-token chunks of the tails into the store, oldest first;
        `chunk_marks(position, n, ref, sink)` gives the `(mask, keep)` of n tokens from a
        position."""
        n0, n1 = _len(self.tail_k[0]), _len(self.tail_k[1])
        if n0 != n1:
            raise RuntimeError(f"pair ({self.spec.prev},{self.spec.cur}): tails of different "
                               f"lengths ({n0} and {n1}); a forward stopped between the layers")
        done = 0
        try:
            while n0 - done >= window:
                sl = slice(done, done + window)
                chunk = [x[:, :, sl] for x in (self.tail_k[0], self.tail_v[0], self.tail_k[1],
                                               self.tail_v[1])]
                # (the tail's first token comes right after the sink and the store)
                marks = (None, None) if chunk_marks is None else chunk_marks(
                    _len(self.sink_k[0]) + self.merged_len(), window, chunk[0], self.spec.sink)
                self.absorb(*chunk, marks=marks)
                done += window
        finally:   # the chunks that did move leave the tails, even if a later one failed
            if done:
                for lst in (self.tail_k, self.tail_v):
                    for side in (0, 1):
                        rest = lst[side][:, :, done:]
                        lst[side] = rest.clone() if rest.shape[2] else None

    # -- reads --
    def merged_states(self, side: int, part: str = "kv"):
        """(keys, values) of the store for one layer, restored, or (None, None); only the
        states named in `part` ("k", "v" or "kv") are restored, the others are None."""
        if self.mk is not None:
            layer = ("prev", "cur")[side]
            return (restore(self.mk, layer) if "k" in part else None,
                    restore(self.mv, layer) if "v" in part else None)
        return self.mean_k, self.mean_v

    def get(self, side: int, part: str = "kv"):
        if side == 0 and self.pending is not None:
            return self.pending
        mk, mv = self.merged_states(side, part)
        k = _cat(_cat(self.sink_k[side], mk), self.tail_k[side]) if "k" in part else None
        v = _cat(_cat(self.sink_v[side], mv), self.tail_v[side]) if "v" in part else None
        return k, v

    def tensors(self) -> list:
        out = [*self.sink_k, *self.sink_v, *self.tail_k, *self.tail_v, self.mean_k, self.mean_v]
        if self.pending is not None:
            out += list(self.pending)
        for m in (self.mk, self.mv):
            if m is not None:
                out += list(m.tensors())
        return [x for x in out if x is not None]

    def shared_nbytes(self) -> int:
        return sum(m.nbytes for m in (self.mk, self.mv) if m is not None) \
            + _nb(self.mean_k) + _nb(self.mean_v)

    def own_nbytes(self, side: int) -> int:
        n = sum(_nb(x) for x in (self.sink_k[side], self.sink_v[side], self.tail_k[side],
                                 self.tail_v[side]))
        if side == 0 and self.pending is not None:
            n += _nb(self.pending[0]) + _nb(self.pending[1])
        return n

    # -- edits --
    def select(self, b_idx, length: int) -> None:
        """Keep batch rows `b_idx` and the first `length` tokens of each layer."""
        if self.pending is not None:
            raise RuntimeError("cannot crop or reorder a pair in the middle of its prefill")
        sink_n = min(_len(self.sink_k[0]), length)
        merged_n = min(self.merged_len(), length - sink_n)
        tail_n = length - sink_n - merged_n
        pick = (lambda x, n: None if x is None or n <= 0 else _own(x[b_idx][:, :, :n]))
        for side in (0, 1):
            self.sink_k[side] = pick(self.sink_k[side], sink_n)
            self.sink_v[side] = pick(self.sink_v[side], sink_n)
            self.tail_k[side] = pick(self.tail_k[side], tail_n)
            self.tail_v[side] = pick(self.tail_v[side], tail_n)
        if self.mk is not None:
            # Cropped tokens leave the store; d_min / d_max stay the extremes of every token that
            # was merged (in a store of no tokens, if none is left), so later chunks keep a
            # threshold at least as strict as before.
            self.mk = _reindex(self.mk, (b_idx, slice(0, merged_n)))
            self.mv = _reindex(self.mv, (b_idx, slice(0, merged_n)))
        self.mean_k = pick(self.mean_k, merged_n)
        self.mean_v = pick(self.mean_v, merged_n)


# ---- the cache ----------------------------------------------------------------------------------
class MiniCache:
    """KV cache of a `num_layers`-layer model with the layer pairs of `plan` merged (MiniCache).

    Args:
        num_layers: number of layers L of the model.
        plan: a `MergePlan`, a list of `(l, l + 1)` tuples / `PairSpec`s, or None for the
            paper's plan (pairs from L // 2). An empty list gives a dense cache.
        t, gamma, magnitude, sink: defaults for pairs given as tuples (and for plan=None).
        window: W >= 1, the number of decoded tokens merged at once (chunked append).

    `update(layer, k, v)` takes `[B, H, S, D]` key and value states of one layer and returns
    the states that the layer attends to; `get(layer)` returns what the cache holds for it.
    For a decoder of one's own: `append(layer, k, v)` stores without restoring, and
    `decode_parts(layer)` / `padded_decode_parts(layer, pads)` give what `decode_attention`
    takes for a one-token step; `set_attention_mask(mask)` for padded batches. Edits:
    `crop(n)`, `select_batch(index)`, `reset()`. Bytes: `nbytes`, `dense_nbytes`,
    `compression_ratio`, `stats()`. See the README's "The cache".
    """

    def __init__(self, num_layers: int, plan=None, *, t: float = DEFAULT_T,
                 gamma: float = DEFAULT_GAMMA, magnitude: str = "norm", sink: int = 0,
                 window: int = DEFAULT_WINDOW):
        num_layers = check_index("num_layers", num_layers, low=1)
        window = check_index("window", window, low=1)
        settings = dict(t=t, gamma=gamma, magnitude=magnitude, sink=sink)
        PairSpec(0, **settings)   # the defaults are checked even where a MergePlan overrides them
        if plan is None:
            plan = MergePlan.paper(num_layers, **settings)
        elif not isinstance(plan, MergePlan):
            plan = MergePlan(plan, num_layers=num_layers, **settings)
        else:
            plan = MergePlan(plan.pairs, num_layers=num_layers)
        self.num_layers, self.plan, self.window = num_layers, plan, window
        self._pairs = {s.prev: _Pair(s) for s in plan}
        self._slerp = any(s.method == "slerp" for s in plan)
        self._dense_k: list = [None] * num_layers
        self._dense_v: list = [None] * num_layers
        self._mask: Optional[torch.Tensor] = None   # bool [B, L]: False = padding

    def __repr__(self) -> str:
        """One line: layers, merged pairs, tokens held, bytes (read from shapes; no sync)."""
        return (f"MiniCache(num_layers={self.num_layers}, pairs={len(self.plan)}, "
                f"window={self.window}, batch={self.batch_size()}, seq_len={self.seq_len(0)}, "
                f"nbytes={self.nbytes}, compression_ratio={self.compression_ratio:.3f})")

    # ---- writes ----
    def _check_layer(self, layer, name: str = "layer") -> int:
        """A layer index in [0, num_layers), as int; errors name the argument `name`."""
        layer = check_int(name, layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{name}: expected an int in [0, {self.num_layers}) (the cache "
                             f"was built for {self.num_layers} layers), got {layer!r}")
        return int(layer)

    def _locate(self, layer: int):
        """(pair, side) of a layer given by the caller (checked), or (None, None)."""
        return self._pair_of(self._check_layer(layer))

    def _pair_of(self, layer: int):
        """(pair, side) of a checked layer index, or (None, None) for a dense layer."""
        found = self.plan.lookup(layer)
        return (None, None) if found is None else (self._pairs[found[0].prev], found[1])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Store new states `[B, H, S, D]` of `layer`. Returns True when they were the first
        states of a merged pair (a prefill chunk, to be attended at full precision). The cache
        holds its own copies: `k` and `v` may be reused or overwritten afterwards."""
        layer = self._check_layer(layer)
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"{name}: expected a [B, H, S, D] tensor, got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"v: [B, H, S] {tuple(v.shape[:3])} does not match k's "
                             f"{tuple(k.shape[:3])}")
        pair, side = self._pair_of(layer)
        self._check_states(layer, k, v, pair)
        if self._mask is not None and self._mask.shape[0] != k.shape[0]:
            raise ValueError(f"mask: the attention mask has {self._mask.shape[0]} rows, "
                             f"layer {layer}'s states a batch of {k.shape[0]}")
        if pair is None:
            self._dense_k[layer] = _append(self._dense_k[layer], k)
            self._dense_v[layer] = _append(self._dense_v[layer], v)
            return False
        if side == 0:
            if pair.pending is not None:
                raise ValueError(f"layer: layer {layer} was updated twice before layer "
                                 f"{layer + 1}, the other layer of its merged pair (a step "
                                 f"updates the layers in order; after a forward that failed "
                                 f"between the two, reset() the cache)")
            if pair.empty():
                pair.pending = (k.clone(), v.clone())     # (the caller may reuse k, v)
                return True
            pair.flush(self.window, self._chunk_marks)
            pair.tail_k[0] = _append(pair.tail_k[0], k)
            pair.tail_v[0] = _append(pair.tail_v[0], v)
            return False
        if pair.pending is not None:
            kp, vp = pair.pending
            if kp.shape[:3] != k.shape[:3]:
                raise ValueError(f"k: layer {layer} got shape {tuple(k.shape)}, layer {layer - 1} "
                                 f"got {tuple(kp.shape)}; a pair's states must match")
            pair.absorb(kp, vp, k, v, self._chunk_marks(0, k.shape[2], k, pair.spec.sink))
            pair.pending = None
            return True
        if pair.seq_len(1) + k.shape[2] != pair.seq_len(0):
            raise ValueError(f"layer: layer {layer} got {k.shape[2]} new tokens, but layer "
                             f"{layer - 1}, the first layer of its merged pair, holds "
                             f"{pair.seq_len(0)} and this one {pair.seq_len(1)} (a step "
                             f"updates layer {layer - 1} first, with as many tokens)")
        pair.tail_k[1] = _append(pair.tail_k[1], k)
        pair.tail_v[1] = _append(pair.tail_v[1], v)
        return False

    def set_attention_mask(self, mask) -> None:
        """Which positions hold padding: `mask` `[B, L]`, bool or integer, 1 / True for a token
        and 0 / False for padding, position 0 being the first token the cache holds (the 2-D
        attention mask that transformers gives a forward: the tokens held and the new ones).
        Positions past L are tokens; None (the default) makes every position a token.

        Merges then leave padding out of each row's d_min / d_max and never retain it (see
        `merge`'s `mask`), and keep a padded row's own first `sink` tokens that fall past the
        sink positions as they are (`merge`'s `keep`): with W = 1, a left-padded row holds, at
        its tokens, exactly what it holds unpadded (in slerp pairs).
        Set it before the forward whose tokens it covers (`minitriton.hf.track_padding` does
        it for every forward of a transformers model). The cache keeps a bool copy on the
        mask's device; integer values are checked on a CPU (on CUDA, where checking would
        synchronise, nonzero is a token). Each merge reads its part of the mask on the host
        (merge synchronises anyway) and passes no mask when it has no padding.

        Example:
            >>> enc = tokenizer(prompts, padding=True, return_tensors="pt")   # left padding
            >>> cache.set_attention_mask(enc["attention_mask"])
        """
        if mask is None:
            self._mask = None
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a [B, L] bool or integer tensor, got "
                            f"{type(mask).__name__}")
        check_dense("mask", mask)
        if mask.dim() != 2:
            raise ValueError(f"mask: expected a [B, L] tensor, got shape {tuple(mask.shape)}")
        check_mask_dtype("mask", mask)
        check_has_data("mask", mask)
        B = self.batch_size()
        if B is not None and mask.shape[0] != B:
            raise ValueError(f"mask: expected {B} rows (the batch held), got {mask.shape[0]}")
        held = token_mask("mask", mask.detach())
        self._mask = held.clone() if mask.dtype == torch.bool else held   # (never the caller's)

    @property
    def attention_mask(self) -> Optional[torch.Tensor]:
        """The padding mask set by `set_attention_mask` (bool `[B, L]`), or None."""
        return self._mask

    def _chunk_marks(self, position: int, n: int, ref: torch.Tensor, sink: int = 0):
        """`(mask, keep)` of the n tokens from `position`, on ref's device: the padding mask
        (None when they are all tokens), and the tokens to keep as they are (None for none):
        each row's first `sink` tokens that a padded row has past the sink positions, which
        the same row unpadded holds in its sink. Read on the host in one read (a CUDA mask
        synchronises, as the merge that follows does)."""
        if self._mask is None:
            return None, None
        end = position + n
        held = self._mask[:, :end]
        if held.shape[1] < end:   # (positions past the mask are tokens)
            held = torch.cat([held, held.new_ones(held.shape[0], end - held.shape[1])], dim=1)
        m = held[:, position:]
        keep = None
        if sink and end > sink:
            # A token's rank in its row: how many tokens come before it.
            first = held & (held.cumsum(dim=1) <= sink)
            first[:, :sink] = False           # (those are in the sink)
            keep = first[:, position:]
            padded, kept = torch.stack([~m.all(), keep.any()]).tolist()
            keep = keep.to(ref.device) if kept else None
        else:
            padded = not bool(m.all())
        return (m.to(ref.device) if padded else None), keep

    def _check_states(self, layer: int, k, v, pair) -> None:
        """New states must be like those the layer (or its pair) already holds: batch, heads,
        head dim, dtype and device; a slerp pair's also mergeable (dtype, head dim), and with
        any slerp pair in the plan every layer's in a mergeable dtype (so a model whose states
        cannot be merged fails at its first layer, not halfway through a forward). Checked
        before anything is stored, so a rejected update leaves the cache as it was."""
        if pair is None:
            refs = (self._dense_k[layer], self._dense_v[layer])
            if self._slerp:   # a model whose merged layers will not take these fails here
                check_tensor("k", k)
                check_tensor("v", v)
        else:
            if pair.spec.method == "slerp":   # ("mean" pairs average any states)
                for name, x in (("k", k), ("v", v)):
                    check_tensor(name, x)
                    check_head_dim(name, x.shape[3])
            refs = self.shape_ref(pair.spec.prev)
            if refs[0] is None:
                refs = self.shape_ref(pair.spec.cur)
        for name, x, ref in (("k", k, refs[0]), ("v", v, refs[1])):
            if ref is None:
                continue
            where = f"layer {layer}: {name}"
            if (x.shape[0], x.shape[1], x.shape[3]) != (ref.shape[0], ref.shape[1], ref.shape[3]):
                raise ValueError(f"{where} of shape {tuple(x.shape)} does not match the "
                                 f"[B, H, *, D] = {tuple(ref.shape[:2]) + (ref.shape[3],)} of "
                                 f"the states held{'' if pair is None else ' for its pair'}")
            if x.dtype != ref.dtype:
                raise TypeError(f"{where} has dtype {x.dtype}, the states held have {ref.dtype}")
            if x.device != ref.device:
                raise ValueError(f"{where} is on {x.device}, the states held are on "
                                 f"{ref.device}")
        if pair is not None:   # (after the device checks: a mismatch is named as such)
            check_has_data("k", k)
            check_has_data("v", v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store new states of `layer` and return `(keys, values)` to attend to: the exact new
        states for a pair's first chunk, else `get(layer)` (everything held, in order)."""
        if self.append(layer, k, v):
            return k, v
        return self.get(layer)

    # ---- reads ----
    def get(self, layer: int):
        """(keys, values) `[B, H, seq_len, D]`: sink, restored merged tokens, tail, in order."""
        return self._get(layer, "kv")

    def get_keys(self, layer: int):
        """The keys of `get(layer)` alone (a merged layer's values are not restored)."""
        return self._get(layer, "k")[0]

    def get_values(self, layer: int):
        """The values of `get(layer)` alone (a merged layer's keys are not restored)."""
        return self._get(layer, "v")[1]

    def _get(self, layer: int, part: str):
        layer = self._check_layer(layer)
        pair, side = self._pair_of(layer)
        if pair is None:
            return self._dense_k[layer], self._dense_v[layer]
        return pair.get(side, part)

    def seq_len(self, layer: int = 0) -> int:
        layer = self._check_layer(layer)
        pair, side = self._pair_of(layer)
        return _len(self._dense_k[layer]) if pair is None else pair.seq_len(side)

    def decode_parts(self, layer: int):
        """What a fused decode step over `layer` needs, or None when the layer has no merged
        (slerp) store: `(k_pair, v_pair, side, k_extra, v_extra)` with side "prev" or "cur" and
        `k_extra`/`v_extra` the dense sink and tail tokens (attention does not depend on the
        order of the tokens it attends to: positions are already in the keys)."""
        pair, side = self._locate(layer)
        if pair is None or pair.mk is None or pair.pending is not None:
            return None
        k_extra = _cat(pair.sink_k[side], pair.tail_k[side])
        v_extra = _cat(pair.sink_v[side], pair.tail_v[side])
        return pair.mk, pair.mv, ("prev", "cur")[side], k_extra, v_extra

    def padded_decode_parts(self, layer: int, pads: torch.Tensor):
        """`decode_parts` for rows whose first `pads[b]` positions are hidden (left padding;
        `pads` an integer `[B]` CPU tensor): `(k_pair, v_pair, side, k_extra, v_extra,
        seq_starts, tail_lens)`, so that `decode_attention(..., seq_starts=seq_starts,
        tail_lens=tail_lens)` attends to the rest alone; or None when the layer has no merged
        store, or when some row's padding reaches into its tail.

        The store's padding is skipped with `seq_starts`; padding in the sink by placing the
        sink after the tail, reversed (attention does not depend on the order of the tokens),
        so that it ends the extra tokens and `tail_lens` leaves it out."""
        layer = self._check_layer(layer)
        if not isinstance(pads, torch.Tensor) or pads.is_floating_point() or pads.is_complex() \
                or pads.dtype == torch.bool:
            raise TypeError(f"pads: expected an integer [B] CPU tensor, got "
                            f"{getattr(pads, 'dtype', type(pads).__name__)}")
        if pads.device.type != "cpu":
            raise ValueError(f"pads: expected a CPU tensor (read on the host), got device "
                             f"{pads.device}")
        B = self.batch_size()
        if B is not None and tuple(pads.shape) != (B,):
            raise ValueError(f"pads: expected shape ({B},) (the batch held), got "
                             f"{tuple(pads.shape)}")
        if pads.numel() and int(pads.min()) < 0:
            raise ValueError(f"pads: expected counts >= 0, got {pads.tolist()}")
        parts = self.decode_parts(layer)
        if parts is None:
            return None
        k_pair, v_pair, side, k_extra, v_extra = parts
        pair, s = self._locate(layer)
        sink, merged = _len(pair.sink_k[s]), pair.merged_len()
        pads = pads.to(torch.int64)
        if bool((pads > sink + merged).any()):
            return None
        dev = k_pair.device
        starts = (pads - sink).clamp(0, merged).to(dtype=torch.int32, device=dev)
        tail_lens = None
        if sink and bool((pads > 0).any()):
            tail = _len(pair.tail_k[s])
            k_extra = _cat(pair.tail_k[s], pair.sink_k[s].flip(2))
            v_extra = _cat(pair.tail_v[s], pair.sink_v[s].flip(2))
            tail_lens = (tail + sink - pads.clamp(max=sink)).to(dtype=torch.int32, device=dev)
        return k_pair, v_pair, side, k_extra, v_extra, starts, tail_lens

    def crop_is_exact(self, layer: int) -> bool:
        """Whether a `crop` leaves `layer` as it was before the cropped tokens came (what a
        rollback, e.g. assisted decoding's, needs): True for a dense layer, a "mean" pair (each
        token is averaged on its own) and a slerp pair with no merged token yet. Once tokens are
        merged, a crop that cuts into them cannot restore the rest: each merged chunk's
        threshold came from the extremes of all its tokens (and a store cropped to no token
        keeps those extremes for the chunks to come)."""
        pair, _ = self._locate(layer)
        return pair is None or pair.spec.method == "mean" or pair.mk is None

    def merged_pairs(self, layer: int):
        """The (keys, values) MergedPairs of `layer`'s pair, or None."""
        pair, _ = self._locate(layer)
        return None if pair is None or pair.mk is None else (pair.mk, pair.mv)

    # ---- bytes ----
    def layer_nbytes(self, layer: int) -> int:
        """Bytes held for one layer (half of its pair's shared store)."""
        pair, side = self._locate(layer)
        if pair is None:
            return _nb(self._dense_k[layer]) + _nb(self._dense_v[layer])
        shared = pair.shared_nbytes()
        return pair.own_nbytes(side) + (shared // 2 if side == 0 else shared - shared // 2)

    def layer_dense_nbytes(self, layer: int) -> int:
        """Bytes of the layer's keys and values as dense `[B, H, seq_len, D]` tensors."""
        k, v = self.shape_ref(layer)
        if k is None:
            return 0
        n = self.seq_len(layer)
        return n * (k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
                    + v.shape[0] * v.shape[1] * v.shape[3] * v.element_size())

    def shape_ref(self, layer: int):
        """Some (keys, values) tensors held for `layer`, with its states' batch, heads, head
        dims, dtype and device, found without restoring anything; (None, None) when empty."""
        pair, side = self._locate(layer)
        if pair is None:
            return self._dense_k[layer], self._dense_v[layer]
        if side == 0 and pair.pending is not None:
            return pair.pending
        for k, v in ((pair.sink_k[side], pair.sink_v[side]), (pair.tail_k[side], pair.tail_v[side]),
                     (pair.mean_k, pair.mean_v)):
            if k is not None:
                return k, v
        if pair.mk is not None:
            return pair.mk.e, pair.mv.e
        return None, None

    def batch_size(self) -> Optional[int]:
        """B of the states held, or None while the cache holds nothing."""
        return next((int(k.shape[0]) for k, _ in map(self.shape_ref, range(self.num_layers))
                     if k is not None), None)

    @property
    def merges(self) -> bool:
        """True when the plan has a slerp pair (its states must suit `merge`)."""
        return self._slerp

    @property
    def nbytes(self) -> int:
        """Every byte of the layers' states held by the cache (all but the padding mask)."""
        return sum(self.layer_nbytes(i) for i in range(self.num_layers))

    @property
    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same tokens would hold."""
        return sum(self.layer_dense_nbytes(i) for i in range(self.num_layers))

    @property
    def compression_ratio(self) -> float:
        """dense_nbytes / nbytes (1.0 for an empty plan, and for a cache that holds no token:
        a store cropped to nothing still holds its d extremes)."""
        dense = self.dense_nbytes
        return dense / self.nbytes if dense else 1.0

    def retained_fraction(self) -> Optional[float]:
        """Fraction of merged token pairs retained (keys and values together), or None."""
        kept = total = 0
        for pair in self._pairs.values():
            for m in (pair.mk, pair.mv):
                if m is not None:
                    kept += m.num_retained
                    total += m.slot.numel()
        return kept / total if total else None

    def stats(self) -> list[dict]:
        """Per layer: seq_len, nbytes, dense_nbytes, compression (1.0 for a layer that holds no
        token), and the pair it belongs to."""
        out = []
        for i in range(self.num_layers):
            found = self.plan.lookup(i)
            nb, dn = self.layer_nbytes(i), self.layer_dense_nbytes(i)
            out.append(dict(layer=i, seq_len=self.seq_len(i), nbytes=nb, dense_nbytes=dn,
                            compression=dn / nb if dn else 1.0,
                            pair=None if found is None else found[0].describe()))
        return out

    # ---- edits ----
    def crop(self, length: int) -> None:
        """Keep the first `length` tokens of every layer (merged tokens are cut out of the store;
        they are not un-merged: see `crop_is_exact`)."""
        length = check_index("length", length)
        self._edit(slice(None), length)
        if self._mask is not None:
            self._mask = self._mask[:, :length]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the batch rows `index` (a 1-d integer tensor)."""
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index: expected a 1-d integer tensor, got {type(index).__name__}")
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-d tensor, got shape {tuple(index.shape)}")
        if index.dtype in (torch.bool, torch.uint8) or index.is_floating_point() \
                or index.is_complex():   # (torch reads a uint8 index as a mask)
            raise TypeError(f"index: expected an integer tensor of int8/16/32/64 row numbers, "
                            f"got dtype {index.dtype}")
        check_has_data("index", index)
        index = index.long()   # (indexing takes int64 or int32 rows only)
        B = self.batch_size()
        rows = B if B is not None or self._mask is None else self._mask.shape[0]
        if rows is not None and index.numel():   # (the batch held, else the mask's rows)
            lo, hi = int(index.min()), int(index.max())
            if lo < -rows or hi >= rows:
                raise ValueError(f"index: batch rows from {lo} to {hi} are out of range for a "
                                 f"batch of {rows}")
        self._edit(index, None)
        if self._mask is not None:   # (its rows are the batch's: checked where it is set)
            self._mask = self._mask[index.to(self._mask.device)]

    def _edit(self, b_idx, length: Optional[int]) -> None:
        for pair in self._pairs.values():   # before anything is edited
            if pair.pending is not None:
                raise RuntimeError(f"cannot crop or reorder pair ({pair.spec.prev},"
                                   f"{pair.spec.cur}) in the middle of its prefill")
        for i in range(self.num_layers):
            if self.plan.lookup(i) is None:
                for store in (self._dense_k, self._dense_v):
                    x = store[i]
                    if x is not None:
                        n = x.shape[2] if length is None else min(length, x.shape[2])
                        store[i] = _own(x[b_idx][:, :, :n])
        for pair in self._pairs.values():
            # (a store cropped to no token still holds its rows' d extremes: they follow the
            # batch rows too)
            if not pair.empty() or pair.mk is not None:
                n = pair.seq_len(0) if length is None else min(length, pair.seq_len(0))
                pair.select(b_idx, n)

    def reset(self) -> None:
        """Drop every stored token (the plan and window stay)."""
        self.__init__(self.num_layers, self.plan, window=self.window)
