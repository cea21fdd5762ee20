"""transformers integration: a `Cache` backed by `minitriton.cache.MiniCache`, and an attention
function that runs single-token decode steps over merged layers with `decode_attention`.

    >>> from minitriton.hf import (MiniCacheHF, cache_kwargs, track_padding,
    ...                            use_minitriton_attention)
    >>> use_minitriton_attention(model)                    # optional: fused decode attention
    >>> track_padding(model)                               # batches with padding (see below)
    >>> cache = MiniCacheHF(model.config, window=16)       # the paper's plan from L // 2
    >>> out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=32)
    >>> cache.compression_ratio

Works with transformers 4.57 to 5.x. Their cache API changed between these releases, and the
layer class below answers both forms:
- `layer.update(k, v, cache_kwargs)` (4.57) and `layer.update(k, v, *args, **kwargs)` (5.x);
- `get_mask_sizes(cache_position)` (4.57, a tensor) and `get_mask_sizes(query_length)` (5.x);
- `get_max_cache_shape()` (4.57) and `get_max_length()` (5.x);
- `crop(max_length)`: 4.57 takes the length to keep (or a negative count to remove), 5.x only
  a negative count to remove; both are accepted (`crop(0)` keeps nothing on 4.x and is a no-op
  on 5.x, as in each release's own caches).
Batch edits (beam search, contrastive search) are done once per cache, not per layer, since the
two layers of a pair share one store.

Fused decode. With `use_minitriton_attention(model)`, the model's attention is "minitriton":
scaled-dot-product attention (transformers' sdpa function), except that for a one-token query
over a merged layer the cache hands the attention function a marker instead of restored states,
and attention runs as `minitriton.decode_attention` over the compressed pair plus the dense sink
and tail, never building the restored cache. A mask that hides each row's first keys (left
padding) runs fused too (`seq_starts` skips the store's padding; padding in a sink is placed
last and left out by `tail_lens`); masks that hide other keys fall back to restore + sdpa.

Padding. transformers does not pass the attention mask to a cache. `track_padding(model)` hands
each forward's 2-D attention mask to the MiniCacheHF that the forward uses (a forward pre-hook;
`use_minitriton_attention` installs it too), so that merges leave a left-padded batch's padding
out of the retention (see `MiniCache.set_attention_mask`). Without it, padding is merged as if
it were tokens.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import transformers

if not transformers.utils.is_torch_available():   # e.g. transformers 5 with torch < 2.6
    raise ImportError(
        f"minitriton.hf: transformers {transformers.__version__} does not enable torch "
        f"{torch.__version__} (transformers 5 needs torch >= 2.6; with torch 2.4 or 2.5 use "
        "transformers 4.57)")

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

from ._checks import check_bool, check_index, check_int
from .cache import DEFAULT_GAMMA, DEFAULT_T, DEFAULT_WINDOW, MiniCache
from .plan import MergePlan
from .decode import decode_attention

ATTENTION_NAME = "minitriton"
_TF_MAJOR = int(transformers.__version__.split(".")[0])
_MARK = "_minitriton_decode"


class MiniCacheLayer(CacheLayerMixin):
    """One layer's view of a `MiniCacheHF` (the states live in the shared `MiniCache`)."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: "MiniCacheHF", layer_idx: int):
        # CacheLayerMixin.__init__ would assign `keys`/`values`, which are read-only views here.
        self._owner, self._idx = owner, layer_idx

    # ---- the states ----
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return self._owner.core.get_keys(self._idx)

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self._owner.core.get_values(self._idx)

    @property
    def is_initialized(self) -> bool:
        return self._owner.core.seq_len(self._idx) > 0

    @property
    def device(self):
        k = self._owner.core.shape_ref(self._idx)[0]
        return None if k is None else k.device

    def lazy_initialization(self, key_states, value_states=None) -> None:
        """Nothing to allocate ahead: the cache grows on the first update."""

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner._update(self._idx, key_states, value_states)

    # ---- sizes ----
    def get_seq_length(self) -> int:
        return self._owner.core.seq_len(self._idx)

    def get_mask_sizes(self, query) -> tuple[int, int]:
        q_len = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    # ---- edits go through the cache (a pair shares one store) ----
    def reset(self) -> None:
        self._owner.reset()

    @property
    def is_croppable(self) -> bool:
        """Whether every crop that generation may make puts this layer back as it was: True
        for a dense layer and a "mean" pair; False for a slerp pair, whose crops are exact only
        until it merges tokens (`MiniCache.crop_is_exact`), which any forward may do.
        transformers 5 asks once, before assisted decoding, and refuses it with such a cache."""
        pair, _ = self._owner.core._locate(self._idx)
        return pair is None or pair.spec.method == "mean"

    def crop(self, n: int) -> None:
        self._owner.crop(n)

    def reorder_cache(self, beam_idx) -> None:
        self._owner.reorder_cache(beam_idx)


def _text_config(config):
    """The decoder's text config of a model config (itself for a plain one, or None)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _attr(config, name: str):
    """config.name, or None where it is missing or cannot be read as one value (a per-layer
    config, e.g. Gemma 4's, raises for an attribute that varies across layers)."""
    try:
        return getattr(config, name, None)
    except Exception:   # (transformers' per-layer error is not an AttributeError)
        return None


def _kv_shared_layers(text, num_layers: int) -> range:
    """The layers that reuse an earlier layer's states instead of updating the cache: the last
    `num_kv_shared_layers` (e.g. Gemma 3n); empty for other models."""
    shared = _attr(text, "num_kv_shared_layers")
    shared = shared if isinstance(shared, int) and 0 < shared < num_layers else 0
    return range(num_layers - shared, num_layers)


def _updating_layers(config) -> int:
    """How many leading layers of the model update the cache: all but the last
    `num_kv_shared_layers` (e.g. Gemma 3n), which reuse earlier layers' states."""
    text = _text_config(config)
    L = _attr(text, "num_hidden_layers")
    return _kv_shared_layers(text, L).start if isinstance(L, int) and L > 0 else L


def _layer_shape(text, layer: int):
    """(head dim, KV heads) of `layer` as its config gives them (None where it does not):
    from the layer's own config where head dims vary across layers (Gemma 4's
    `per_layer_config`), else from the model's."""
    per = _attr(text, "per_layer_config")
    if per is not None:
        try:
            text = per[layer]
        except Exception:   # (no such layer, or not indexable: the model's own values)
            pass
    D = _attr(text, "head_dim")
    heads, hidden = _attr(text, "num_attention_heads"), _attr(text, "hidden_size")
    if D is None and isinstance(heads, int) and heads and isinstance(hidden, int):
        D = hidden // heads
    kv = _attr(text, "num_key_value_heads")
    return (D if isinstance(D, int) else None, kv if isinstance(kv, int) else None)


def _check_layer_shapes(config, plan) -> None:
    """A pair's two layers must hold states of one shape, and a slerp pair a head dim that
    merge supports: both known from the config, so a plan that cannot run is refused before
    the first forward (which would otherwise fail halfway, with some layers updated)."""
    from ._checks import MAX_HEAD_DIM, MIN_HEAD_DIM
    text = _text_config(config)
    for spec in plan:
        (d_p, h_p), (d_c, h_c) = (_layer_shape(text, layer) for layer in spec.layers)
        for name, a, b in (("head dim", d_p, d_c), ("KV heads", h_p, h_c)):
            if a is not None and b is not None and a != b:
                raise ValueError(f"plan: pair {spec.layers} joins layers of different shapes "
                                 f"({name} {a} in layer {spec.prev}, {b} in layer {spec.cur}); "
                                 f"pair layers of one shape")
        if spec.method != "slerp":
            continue
        for layer, D in zip(spec.layers, (d_p, d_c)):
            if D is not None and not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
                raise ValueError(f"config: head dim {D} (layer {layer}) cannot be merged "
                                 f"(merge supports [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]); use "
                                 f"plan=[] for a dense cache, or pair other layers")


class MiniCacheHF(Cache):
    """A transformers `Cache` that merges the KV states of adjacent layer pairs (MiniCache).

    Args:
        config: the model's config (its text config gives the number of layers, the head dim
            and any layers that share states), or None with `num_layers`. Whether a step runs
            fused is read from the running model instead (see `fused_decode`).
        plan: as for `MiniCache`: None (the paper's pairs from L // 2), a `MergePlan`, a list of
            `(l, l + 1)` / `PairSpec`, or [] for no merging.
        num_layers, t, gamma, magnitude, sink, window: as for `MiniCache` (num_layers, when
            given with a config, must match its number of layers).
        fused_decode: use `decode_attention` for one-token steps over merged layers when the model
            running the forward was switched by `use_minitriton_attention` (the model decides,
            not `config`: a cache built with config=None fuses too). Default True.

    Use it as `model.generate(..., **cache_kwargs(model, cache))` or likewise in `model(...)`:
    `cache=cache` on the transformers releases whose forward takes `cache` (5.x; they warn
    that `past_key_values=` is deprecated), `past_key_values=cache` on 4.57. The merge
    statistics are those of `MiniCache`: `nbytes`, `dense_nbytes`, `compression_ratio`,
    `stats()`.
    """

    def __init__(self, config=None, plan=None, *, num_layers: Optional[int] = None,
                 t: float = DEFAULT_T, gamma: float = DEFAULT_GAMMA, magnitude: str = "norm",
                 sink: int = 0, window: int = DEFAULT_WINDOW, fused_decode: bool = True):
        if config is None and num_layers is None:
            raise ValueError("config: expected a model config (or pass num_layers), got None")
        text = _text_config(config)
        if num_layers is None:
            if getattr(text, "num_hidden_layers", None) is None:
                raise TypeError(f"config: expected a model config with num_hidden_layers (or "
                                f"pass num_layers), got {type(config).__name__}")
            num_layers = check_index("config.num_hidden_layers", text.num_hidden_layers, low=1)
        elif getattr(text, "num_hidden_layers", None) is not None \
                and check_index("num_layers", num_layers, low=1) != text.num_hidden_layers:
            raise ValueError(f"num_layers: {num_layers} does not match the config's "
                             f"num_hidden_layers={text.num_hidden_layers} (pass one or the "
                             f"other)")
        shared = _kv_shared_layers(text, num_layers) if config is not None else range(0)
        if plan is None and len(shared):   # the paper's plan over the layers that update
            plan = MergePlan.paper(shared.start, t=t, gamma=gamma, magnitude=magnitude,
                                   sink=sink)
        self.core = MiniCache(num_layers, plan, t=t, gamma=gamma, magnitude=magnitude, sink=sink,
                              window=window)
        touched = sorted(set(self.core.plan.merged_layers()) & set(shared))
        if touched:
            raise ValueError(f"plan: layers {touched} never update the cache (the model's last "
                             f"{len(shared)} layers reuse earlier layers' states: "
                             f"num_kv_shared_layers={len(shared)}), so no pair can include "
                             f"them; merge layers below {shared.start}")
        if config is not None:
            _check_layer_shapes(config, self.core.plan)
        self.fused_decode = check_bool("fused_decode", fused_decode)
        self.fused_steps = 0   # layer steps that ran decode_attention (for tests and reports)
        self._mask_memo = None  # (weakref to the last attention mask, its version, open?)
        self._runner = None     # the config of the model whose forward is running, if hooked
        self._outer_runners: list = []   # those of the forwards it runs within (nested calls)
        super().__init__(layers=[MiniCacheLayer(self, i) for i in range(num_layers)])

    def __getstate__(self):
        """Pickling (`torch.save`, `copy.deepcopy`) leaves out the attention-mask memo (a weak
        reference, and only a shortcut) and the running model's config (set anew by the hook
        of the next forward)."""
        state = self.__dict__.copy()
        state["_mask_memo"] = None
        state["_runner"], state["_outer_runners"] = None, []
        return state

    @property
    def plan(self):
        return self.core.plan

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can put every layer back as it was (see `MiniCacheLayer`)."""
        return all(layer.is_croppable for layer in self.layers)

    @property
    def is_initialized(self) -> bool:
        """Whether every layer holds states (after the first forward), as for DynamicCache."""
        return all(layer.is_initialized for layer in self.layers)

    # ---- the update that the model's attention layers call ----
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer_idx = self.core._check_layer(layer_idx, "layer_idx")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_attention_mask(self, mask) -> None:
        """The 2-D attention mask `[B, L]` of the tokens held and those of the next forward
        (0 for padding), or None: see `MiniCache.set_attention_mask`. `track_padding(model)`
        calls it before every forward of the model."""
        self.core.set_attention_mask(mask)

    def _fused(self, layer_idx: int, key_states: torch.Tensor, value_states) -> bool:
        """Whether this update hands the attention function markers: a one-token step over a
        merged layer, inside a forward of a model switched by `use_minitriton_attention` (its
        hook sets `_runner` for the forward's duration) whose attention is "minitriton". The
        running model decides, not the config the cache was built from: a cache loaded or
        built elsewhere and used with another model's attention never hands out markers."""
        if not self.fused_decode or key_states.shape[2] != 1 or self._runner is None:
            return False
        if value_states.shape[3] != key_states.shape[3]:   # (decode_attention takes one D)
            return False
        if _attr(self._runner, "_attn_implementation") != ATTENTION_NAME:
            return False
        return self.core.decode_parts(layer_idx) is not None

    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self._fused(layer_idx, key_states, value_states):
            # The attention function finds the compressed pair through these empty markers.
            self.core.append(layer_idx, key_states, value_states)
            B, H, _, D = key_states.shape
            k_mark = key_states.new_empty((B, H, 0, D))
            v_mark = value_states.new_empty((B, H, 0, value_states.shape[3]))
            mark = (self, layer_idx)
            setattr(k_mark, _MARK, mark)
            setattr(v_mark, _MARK, mark)   # (both must reach the attention function as given)
            return k_mark, v_mark
        return self.core.update(layer_idx, key_states, value_states)

    # ---- statistics ----
    @property
    def nbytes(self) -> int:
        return self.core.nbytes

    @property
    def dense_nbytes(self) -> int:
        return self.core.dense_nbytes

    @property
    def compression_ratio(self) -> float:
        return self.core.compression_ratio

    def stats(self) -> list[dict]:
        return self.core.stats()

    # ---- edits (once for the whole cache) ----
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held by layer `layer_idx` (negative: from the last layer); 0 past the last
        layer, as transformers' caches answer."""
        L = self.core.num_layers
        layer_idx = check_int("layer_idx", layer_idx)
        if layer_idx >= L:
            return 0
        if layer_idx < -L:
            raise ValueError(f"layer_idx: expected an int >= {-L} ({L} layers), got {layer_idx!r}")
        return self.core.seq_len(layer_idx % L)

    def reset(self) -> None:
        self.core.reset()

    def crop(self, n: int) -> None:
        """Keep the first n tokens (n >= 0; on transformers 5, 0 keeps everything, as its caches
        do), or drop the last -n (n < 0)."""
        n = check_int("n", n, "an int (a length to keep, or a negative count to drop)")
        current = self.get_seq_length()
        if n < 0:
            keep = current + n
        elif n == 0 and _TF_MAJOR >= 5:
            return
        else:
            keep = n
        self.core.crop(max(min(keep, current), 0))

    def reorder_cache(self, beam_idx) -> None:
        """Keep (reorder, repeat) the batch rows `beam_idx`: integer row numbers, as a tensor
        or a sequence (checked by `MiniCache.select_batch`; never coerced)."""
        if self.get_seq_length() > 0:
            if not isinstance(beam_idx, torch.Tensor):
                beam_idx = torch.as_tensor(beam_idx)
                if not beam_idx.numel():   # (an empty list reads as float32)
                    beam_idx = beam_idx.long()
            self.core.select_batch(beam_idx)

    def batch_select_indices(self, indices) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        repeats = check_index("repeats", repeats, low=1)
        B = self.core.batch_size()
        if B:
            self.core.select_batch(torch.arange(B).repeat_interleave(repeats))


_FORWARD_PARAMS: dict = {}


def forward_params(model) -> tuple:
    """The names of the parameters of `model.forward`, in order (looked up once per model
    class)."""
    key = type(model)
    if key not in _FORWARD_PARAMS:
        import inspect
        _FORWARD_PARAMS[key] = tuple(inspect.signature(model.forward).parameters)
    return _FORWARD_PARAMS[key]


def _check_fits(model, cache) -> None:
    """A MiniCacheHF with more layers than the model's config has is refused (its extra layers
    would never fill, and a pair past the last layer never merges). (Fewer are refused at the
    first update past them; a model whose last layers share earlier layers' states may use a
    cache of fewer layers.)"""
    layers = getattr(_text_config(getattr(model, "config", None)), "num_hidden_layers", None)
    if isinstance(layers, int) and cache.core.num_layers > layers:
        raise ValueError(f"cache: built for {cache.core.num_layers} layers, but the model has "
                         f"{layers} (num_hidden_layers); build it from this model's config")


def cache_kwargs(model, cache) -> dict:
    """`{"cache": cache}` for models whose forward takes `cache` (transformers >= 5.x), else
    `{"past_key_values": cache}`. A MiniCacheHF built for more layers than the model has is
    refused (ValueError)."""
    if isinstance(cache, MiniCacheHF):
        _check_fits(model, cache)
    return {"cache": cache} if "cache" in forward_params(model) else {"past_key_values": cache}


# ---- the attention function --------------------------------------------------------------------
def _hidden_prefix(mask: torch.Tensor):
    """What a one-token query's mask hides (one host synchronisation when it lives on a GPU):
    None for nothing; for a `[B, 1, 1, L]` mask that hides the first pads[b] keys of each row
    and nothing else (left padding), pads as a CPU int64 `[B]` tensor; False for any other
    mask. A bool mask shows True and hides False; an additive one shows 0 and hides its
    dtype's lowest value or -inf, and any other value (a bias) is False: attention must add it."""
    if mask.dtype == torch.bool:
        visible, hidden = mask, ~mask
    elif mask.is_floating_point():
        visible, hidden = mask == 0, mask <= torch.finfo(mask.dtype).min
    else:
        visible, hidden = mask != 0, mask == 0
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None if bool(visible.all()) else False
    visible, hidden = visible[:, 0, 0], hidden[:, 0, 0]                      # [B, L]
    pads = hidden.to(torch.int32).cumprod(-1).sum(-1)                        # leading hidden
    prefix = torch.arange(visible.shape[-1], device=mask.device) >= pads.unsqueeze(-1)
    left = (prefix == visible).all() & (visible | hidden).all()
    found = torch.cat([pads.to(torch.int64), left.to(torch.int64).view(1)]).cpu()  # (one read)
    if not found[-1]:
        return False
    pads = found[:-1]
    return None if not bool(pads.any()) else pads


def _mask_verdict(mask, owner):
    """`_hidden_prefix` of the mask (None also for no mask, False for a non-tensor).

    All layers of one forward get the same mask tensor: its verdict is kept on `owner` and
    reused while the tensor is the same object at the same version (not edited in place), so a
    decode step synchronises with the host once, not once per merged layer. A tensor made under
    `torch.inference_mode()` has no version counter: its verdict is computed every time."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return False
    if mask.is_inference():
        return _hidden_prefix(mask)
    memo = owner._mask_memo
    if memo is not None and memo[0]() is mask and memo[1] == mask._version:
        return memo[2]
    verdict = _hidden_prefix(mask)
    owner._mask_memo = (weakref.ref(mask), mask._version, verdict)
    return verdict


def minitriton_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """transformers attention function (query `[B, Hq, q_len, D]`) returning
    `(out [B, q_len, Hq, D], None)`: `decode_attention` for a one-token query over a merged
    layer (left padding included), scaled-dot-product attention otherwise (longer queries,
    masks that hide other cached tokens or add a bias, padding in the tail, layers given a
    `sliding_window` (a window that only the mask shows hides a prefix of the keys, which the
    fused decode skips exactly, as it does left padding), states of different dtypes, and
    steps that need gradients or dropout). Logit soft-capping (e.g. Gemma 2) is refused:
    neither computes it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    if softcap is not None:
        raise ValueError(f"softcap: the {ATTENTION_NAME!r} attention has no logit soft-capping "
                         f"(got {softcap!r}); use the model's own attention with MiniCacheHF")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"s_aux: the {ATTENTION_NAME!r} attention has no attention sinks (a "
                         f"learned logit per head, e.g. GPT-OSS); use the model's own "
                         f"attention with MiniCacheHF")
    mark = getattr(key, _MARK, None)
    if mark is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if getattr(value, _MARK, None) is not mark:
        raise ValueError(
            f"value: the {ATTENTION_NAME!r} attention got the cache's key marker with other "
            f"values: this model changes the values the cache returns before its attention "
            f"(e.g. DiffLlama splits them), which the fused decode cannot follow; use "
            f"MiniCacheHF with the model's own attention, or fused_decode=False")
    owner, layer_idx = mark
    mk, mv = owner.core.merged_pairs(layer_idx)
    # decode_attention has no sliding window: such layers restore. It takes one dtype: under
    # autocast, RoPE can leave q and k in float32 beside bfloat16 values, and such steps
    # restore too (sdpa then runs in autocast's dtype, as it would over a dense cache).
    plain = kwargs.get("sliding_window") is None and query.dtype == mk.dtype == mv.dtype
    # decode_attention is not differentiable and has no dropout: training steps restore.
    inference = dropout == 0.0 and not (torch.is_grad_enabled() and query.requires_grad)
    parts = None
    if plain and inference and query.shape[2] == 1:
        hidden = _mask_verdict(attention_mask, owner)
        if hidden is None:
            parts = (*owner.core.decode_parts(layer_idx), None, None)
        elif hidden is not False and attention_mask.shape[-1] == owner.core.seq_len(layer_idx):
            # Left padding: the hidden keys are each row's first ones (None if not expressible)
            parts = owner.core.padded_decode_parts(layer_idx, hidden)
    if parts is not None:
        k_pair, v_pair, side, k_extra, v_extra, starts, tail_lens = parts
        o = decode_attention(query[:, :, 0], k_pair, v_pair, layer=side, k_tail=k_extra,
                             v_tail=v_extra, seq_starts=starts, tail_lens=tail_lens,
                             sm_scale=scaling)
        owner.fused_steps += 1
        return o.unsqueeze(1), None
    k, v = owner.core.get(layer_idx)
    return sdpa_attention_forward(module, query, k, v, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register_attention() -> None:
    """Register "minitriton" in transformers' attention (and attention-mask) interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, minitriton_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _call_cache(module, args, kwargs):
    """The MiniCacheHF a forward call uses (passed as `past_key_values=` or `cache=`, by
    keyword or position), and its named arguments; None if it uses none."""
    named = dict(zip(forward_params(module), args), **kwargs)   # (arguments given by position)
    cache = named.get("past_key_values")
    if cache is None:
        cache = named.get("cache")
    return (cache if isinstance(cache, MiniCacheHF) else None), named


def _hand_over_mask(module, args, kwargs):
    """Forward pre-hook: the call's 2-D attention mask to the MiniCacheHF it uses, read as
    transformers reads it (nonzero for a token, whatever its dtype); None for a call without
    one, or with a 4-D mask, which says nothing about padding positions (a call nested in a
    hooked forward, e.g. a causal LM's decoder, keeps the outer call's mask). The cache also
    learns the running model's config (whether its attention is "minitriton") until the
    forward ends."""
    cache, named = _call_cache(module, args, kwargs)
    if cache is not None:
        nested = bool(cache._outer_runners)
        cache._outer_runners.append(cache._runner)   # (first: `_forward_done` pops it, always)
        cache._runner = getattr(module, "config", None)
        _check_fits(module, cache)
        mask = named.get("attention_mask")
        if not nested:
            cache.set_attention_mask(mask != 0 if isinstance(mask, torch.Tensor)
                                     and mask.dim() == 2 else None)


def _forward_done(module, args, kwargs, output):
    """Forward hook (run on errors too): the forward's cache runs under the forward it was
    called from again (hooked models nest: a causal LM and its decoder), or under none."""
    cache, _ = _call_cache(module, args, kwargs)
    if cache is not None:
        cache._runner = cache._outer_runners.pop() if cache._outer_runners else None


_HOOK_ATTR = "_minitriton_padding_hook"


def track_padding(model):
    """Hand every forward's 2-D attention mask to the MiniCacheHF it uses (passed as
    `past_key_values=` or `cache=`), before the forward runs: merges then leave padding out
    of the retention (with W = 1, a left-padded row then holds, at its tokens, what it holds
    unpadded, in slerp pairs; see `MiniCache.set_attention_mask`). The same hooks tell the
    cache which model runs the forward (whether a step may run fused: `MiniCacheHF._fused`).
    Installed once per model, on the model and on its decoder (`get_decoder()`), so that
    `model(...)`, `model.forward(...)` and calls of the decoder itself are seen (a forward
    pre-hook and a forward hook; calling it again changes nothing); other caches are left
    alone. Returns the model.

    Example:
        >>> tokenizer.padding_side = "left"
        >>> tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token   # (if it has none)
        >>> enc = tokenizer(prompts, padding=True, return_tensors="pt")
        >>> cache = MiniCacheHF(model.config)
        >>> out = track_padding(model).generate(**enc, **cache_kwargs(model, cache),
        ...                                     max_new_tokens=16)
    """
    modules = [model]
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        modules.append(decoder)   # (calls of `model.forward` or of the decoder itself)
    for module in modules:
        if getattr(module, _HOOK_ATTR, None) is None:
            setattr(module, _HOOK_ATTR, (
                module.register_forward_pre_hook(_hand_over_mask, with_kwargs=True),
                module.register_forward_hook(_forward_done, with_kwargs=True, always_call=True)))
    return model


# Model types whose attention reads the cache's returned states outside the attention function.
_STATES_USED_OUTSIDE_ATTENTION = ("diffllama", "doge")


def use_minitriton_attention(model):
    """Switch `model` to the "minitriton" attention (sdpa + fused decode over merged layers),
    and `track_padding(model)`.

    Refused (ValueError), since neither sdpa nor `decode_attention` computes what their
    attention does (MiniCacheHF itself works with the model's own attention):
    - logit soft-capping (`attn_logit_softcapping`, e.g. Gemma 2);
    - attention sinks (a `sinks` parameter in an attention module, passed to the attention
      function as `s_aux`, e.g. GPT-OSS);
    - multi-head latent attention (`kv_lora_rank`, e.g. DeepSeek-V2/V3): on transformers 5
      the cache holds latents that the model expands into keys and values after the cache
      update, so there is no merged key for a fused decode to read (on 4.57 the cache holds
      the keys and values, whose head dims differ, so no step would run fused either);
    - models whose attention uses the states the cache returns other than by passing them to
      the attention function (DiffLlama splits the values, Doge builds its mask from them):
      a fused step hands out empty markers in their place. (Another such model is refused at
      its first fused step, where the markers do not arrive as given.)"""
    text = _text_config(getattr(model, "config", None))
    kind = _attr(text, "model_type")
    if kind in _STATES_USED_OUTSIDE_ATTENTION:
        raise ValueError(f"model: its attention ({kind!r}) uses the keys or values the cache "
                         f"returns outside the attention function, where a fused step hands "
                         f"out markers; use MiniCacheHF with the model's own attention")
    softcap = _attr(text, "attn_logit_softcapping")
    if softcap is not None:
        raise ValueError(f"model: its attention soft-caps logits (attn_logit_softcapping="
                         f"{softcap!r}), which the {ATTENTION_NAME!r} attention does not; use "
                         f"MiniCacheHF with the model's own attention")
    sinks = next((name for name, mod in model.named_modules()
                  if isinstance(getattr(mod, "sinks", None), torch.Tensor)), None)
    if sinks is not None:
        raise ValueError(f"model: its attention has attention sinks ({sinks}.sinks), which the "
                         f"{ATTENTION_NAME!r} attention does not; use MiniCacheHF with the "
                         f"model's own attention")
    rank = _attr(text, "kv_lora_rank")
    if rank is not None:
        raise ValueError(f"model: its attention is multi-head latent attention (kv_lora_rank="
                         f"{rank!r}), which the fused decode cannot run (transformers 5 caches "
                         f"latents that the model expands after the cache update); use "
                         f"MiniCacheHF with the model's own attention")
    register_attention()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (AttributeError, ValueError):
        model.config._attn_implementation = ATTENTION_NAME
    return track_padding(model)


__all__ = ["MiniCacheHF", "MiniCacheLayer", "minitriton_attention", "register_attention",
           "use_minitriton_attention", "track_padding", "cache_kwargs", "ATTENTION_NAME"]
