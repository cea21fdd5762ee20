"""transformers integration on a tiny randomly initialised Llama (fast; no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from helpers import tiny_llama  # noqa: E402

from minitriton.cache import PairSpec  # noqa: E402
import minitriton  # noqa: E402
from minitriton.hf import (ATTENTION_NAME, MiniCacheHF, cache_kwargs,  # noqa: E402
                           track_padding, use_minitriton_attention)

L = 6


@pytest.fixture(scope="module")
def model():
    yield from tiny_llama(vocab_size=96, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (1, n), generator=g)


def _generate(model, ids, cache, n=16):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, **cache_kwargs(model, cache))


def test_empty_plan_reproduces_dynamic_cache(model):
    ids = _ids(20)
    want = _generate(model, ids, DynamicCache())
    cache = MiniCacheHF(model.config, [])
    got = _generate(model, ids, cache)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 20 + 16 - 1 and cache.compression_ratio == 1.0


def test_generate_with_a_plan(model):
    ids = _ids(24, seed=1)
    cache = MiniCacheHF(model.config, window=4)          # the paper's pairs (3,4)
    out = _generate(model, ids, cache, n=20)
    assert out.shape == (1, 44)
    assert [s.layers for s in cache.plan] == [(3, 4)]
    for layer in range(L):
        assert cache.get_seq_length(layer) == 43
        assert cache.layers[layer].keys.shape == (1, 2, 43, 16)
    assert 1.0 < cache.compression_ratio < 2.0
    mk, _ = cache.core.merged_pairs(3)
    assert mk.shape[2] >= 24 + 12                         # prompt + whole W-chunks merged


def test_prefill_logits_do_not_depend_on_the_plan(model):
    ids = _ids(30, seed=2)
    with torch.no_grad():
        dense = model(input_ids=ids, **cache_kwargs(model, DynamicCache())).logits
        merged = model(input_ids=ids, **cache_kwargs(model, MiniCacheHF(model.config))).logits
    assert torch.equal(dense, merged)


def test_fused_decode_matches_restore(model):
    """One-token steps over merged layers run decode_attention and agree with restore + sdpa."""
    ids = _ids(25, seed=3)
    plan = [PairSpec(1, gamma=0.2, sink=2), PairSpec(3, magnitude="projection")]
    plain = MiniCacheHF(model.config, plan, window=3)
    fused = MiniCacheHF(model.config, plan, window=3)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, plain))
        cfg = model.config._attn_implementation
        use_minitriton_attention(model)
        try:
            assert model.config._attn_implementation == ATTENTION_NAME
            model(input_ids=ids, **cache_kwargs(model, fused))
            for step in range(5):
                tok = _ids(1, seed=10 + step)
                model.set_attn_implementation(cfg)
                a = model(input_ids=tok, **cache_kwargs(model, plain)).logits
                use_minitriton_attention(model)
                b = model(input_ids=tok, **cache_kwargs(model, fused)).logits
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        finally:
            model.set_attn_implementation(cfg)
    assert fused.fused_steps == 5 * 4 and plain.fused_steps == 0
    for layer in range(L):
        for x, y in zip(fused.core.get(layer), plain.core.get(layer)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_crop_and_batch_edits(model):
    ids = torch.cat([_ids(12, seed=4), _ids(12, seed=5)])
    cache = MiniCacheHF(model.config, window=2)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache))
        for step in range(4):
            model(input_ids=ids[:, step:step + 1], **cache_kwargs(model, cache))
    before = cache.core.get(3)[0]
    cache.crop(-2)                                       # remove 2 tokens (both releases)
    assert cache.get_seq_length() == 14
    cache.crop(13)                                       # keep 13 (4.x form)
    assert cache.get_seq_length() == 13
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.core.get(3)[0], before[:, :, :13].repeat_interleave(2, dim=0))
    cache.reorder_cache(torch.tensor([3, 0]))
    assert torch.equal(cache.core.get(3)[0], before[[1, 0]][:, :, :13])
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


def test_crop_is_exact_only_before_merging(model):
    """A slerp pair can be cropped back exactly only while none of its tokens are merged (each
    merged chunk's threshold came from all its tokens), and any forward may merge: its layers
    are never `is_croppable`, and transformers >= 5 refuses assisted decoding instead of
    decoding differently from greedy, even when the prompt merged nothing yet (sink 16).
    Dense layers and "mean" pairs stay croppable."""
    ids = _ids(12, seed=3)
    caches = [MiniCacheHF(model.config, []),
              MiniCacheHF(model.config, [PairSpec(3, method="mean")], window=4),
              MiniCacheHF(model.config, window=4)]                      # slerp (3, 4)
    for cache in caches:
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache))
    dense, mean, slerp = caches
    assert dense.is_croppable and mean.is_croppable and not slerp.is_croppable
    assert not slerp.core.crop_is_exact(3) and slerp.core.crop_is_exact(2)
    assert [layer.is_croppable for layer in slerp.layers] == [i not in (3, 4) for i in range(L)]
    assert not MiniCacheHF(model.config, window=4).is_croppable    # (nothing held yet)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                  do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=2)
        for sink in (0, 16):
            with torch.no_grad(), pytest.raises(ValueError, match="cropped"):
                model.generate(**kw, **cache_kwargs(model, MiniCacheHF(model.config, window=4,
                                                                       sink=sink)))
        with torch.no_grad():
            got = model.generate(**kw, **cache_kwargs(model, MiniCacheHF(model.config, [])))
        assert torch.equal(got, _generate(model, ids, DynamicCache(), n=6))


def test_bad_batch_edits_and_layers_are_named(model):
    """Batch edits take integer row numbers (never coerced from masks or floats), a repeat
    count >= 1, and updates a layer index in range."""
    ids = torch.cat([_ids(6, seed=4), _ids(6, seed=5)])
    cache = MiniCacheHF(model.config, window=2)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache))
    before = cache.core.get(3)[0].clone()
    for edit, exc, match in (
            (lambda: cache.reorder_cache(torch.tensor([True, False])), TypeError, "index:"),
            (lambda: cache.reorder_cache(torch.tensor([1.7, 0.2])), TypeError, "index:"),
            (lambda: cache.batch_select_indices([1.0]), TypeError, "index:"),
            (lambda: cache.batch_repeat_interleave(-1), ValueError, "repeats: expected an int"),
            (lambda: cache.batch_repeat_interleave(0), ValueError, "repeats: expected an int"),
            (lambda: cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), L),
             ValueError, f"layer_idx: expected an int in \\[0, {L}\\) \\(the cache was built "
                         f"for {L} layers\\), got {L}"),
            (lambda: cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), "0"),
             TypeError, "layer_idx: expected an int, got str")):
        with pytest.raises(exc, match=match):
            edit()
        assert torch.equal(cache.core.get(3)[0], before)
    cache.reorder_cache([1, 0])                               # a list of rows is fine
    assert torch.equal(cache.core.get(3)[0], before[[1, 0]])
    n = cache.get_seq_length()
    for edit, exc, match in ((lambda: cache.crop(-2.5), TypeError, "n: expected an int"),
                             (lambda: cache.crop("3"), TypeError, "n: expected an int"),
                             (lambda: cache.get_seq_length("3"), TypeError, "layer_idx: "),
                             (lambda: cache.get_seq_length(-L - 1), ValueError, "layer_idx: ")):
        with pytest.raises(exc, match=match):
            edit()
    assert cache.get_seq_length() == n
    assert cache.get_seq_length(-1) == cache.get_seq_length(L - 1) == n   # (as DynamicCache)
    assert cache.get_seq_length(L) == 0
    cache.reorder_cache([])                                   # an empty list of rows is fine
    assert cache.core.batch_size() == 0
    with pytest.raises(TypeError, match="fused_decode: expected a bool, got str"):
        MiniCacheHF(model.config, fused_decode="no")


def test_is_initialized_after_the_first_forward(model):
    cache = MiniCacheHF(model.config, window=2)
    assert not cache.is_initialized
    with torch.no_grad():
        model(input_ids=_ids(5), **cache_kwargs(model, cache))
    assert cache.is_initialized
    cache.reset()
    assert not cache.is_initialized


def test_fused_decode_under_autocast(model):
    """Under autocast, RoPE leaves q and k in float32 beside bfloat16 values: such steps attend
    through restore + sdpa (decode_attention takes one dtype) and generate what the cache does
    without the fused decode; steps with one dtype run fused."""
    ids = _ids(20, seed=8)
    cfg = model.config._attn_implementation
    outs, caches = [], []
    try:
        for fused in (False, True):
            if fused:
                use_minitriton_attention(model)
            cache = MiniCacheHF(model.config, window=2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(_generate(model, ids, cache, n=6))
            caches.append(cache)
            mk, mv = cache.core.merged_pairs(3)
            assert (mk.dtype, mv.dtype) == (torch.float32, torch.bfloat16)
        assert torch.equal(outs[1], outs[0])
        assert caches[1].fused_steps == 0
        assert [caches[1].get_seq_length(i) for i in range(L)] == [25] * L
        fused = MiniCacheHF(model.config, window=2)           # one dtype: fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            _generate(model, ids, fused, n=3)
        assert fused.fused_steps == 2 * 2
    finally:
        model.set_attn_implementation(cfg)


def test_soft_capped_models_are_refused():
    """Neither sdpa nor decode_attention soft-caps logits: use_minitriton_attention refuses a
    model that does (MiniCacheHF works with its own attention), and so does the attention
    function if it is set by hand."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from minitriton.hf import minitriton_attention

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, attn_logit_softcapping=50.0)
    gemma = Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        use_minitriton_attention(gemma)
    q = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="softcap: the 'minitriton' attention"):
        minitriton_attention(gemma.model.layers[0].self_attn, q, q, q, None, softcap=50.0)
    ids = _ids(6) % 64
    with torch.no_grad():                                     # the cache with its own attention
        cache = MiniCacheHF(config, [(0, 1)], window=2)
        gemma(input_ids=ids, **cache_kwargs(gemma, cache))
    assert cache.get_seq_length() == 6


def test_models_with_attention_sinks_are_refused():
    """Attention sinks (GPT-OSS: a learned logit per head, passed as `s_aux`) are computed by
    neither sdpa nor decode_attention: use_minitriton_attention refuses such a model, and so
    does the attention function if it is set by hand; the cache works with its own
    attention."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from minitriton.hf import minitriton_attention

    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                          layer_types=["full_attention"] * 2, pad_token_id=0)
    config._attn_implementation = "eager"
    gpt = GptOssForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"attention sinks \(model.layers.0.self_attn.sinks\)"):
        use_minitriton_attention(gpt)
    assert gpt.config._attn_implementation == "eager"
    q = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="s_aux: the 'minitriton' attention"):
        minitriton_attention(gpt.model.layers[0].self_attn, q, q, q, None,
                             s_aux=torch.zeros(2))
    ids = _ids(6) % 64
    with torch.no_grad():
        want = gpt(input_ids=ids, **cache_kwargs(gpt, DynamicCache())).logits
        got = gpt(input_ids=ids, **cache_kwargs(gpt, MiniCacheHF(config, []))).logits
    assert torch.equal(got, want)


def test_latent_attention_models_are_refused():
    """Multi-head latent attention (DeepSeek-V3) caches latents that the model expands after
    the cache update: use_minitriton_attention refuses it (no merged keys for a fused decode);
    the cache works with the model's own attention."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=64, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=32,
                              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                              first_k_dense_replace=2, pad_token_id=0)
    deepseek = DeepseekV3ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="multi-head latent attention \\(kv_lora_rank=32\\)"):
        use_minitriton_attention(deepseek)
    ids = _ids(7) % 64
    with torch.no_grad():
        out = deepseek.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=3, do_sample=False, pad_token_id=0,
                                **cache_kwargs(deepseek, MiniCacheHF(config, [(0, 1)],
                                                                     window=1)))
    assert out.shape == (1, 10)


def test_fused_decode_needs_one_head_dim():
    """decode_attention takes keys and values of one head dim: a one-token step whose values
    have another one is stored and attended through restore (states returned), not fused."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                          _attn_implementation=ATTENTION_NAME)
    for dv, fused in ((16, True), (24, False)):
        cache = MiniCacheHF(cfg, [(0, 1)], window=1)
        cache._runner = cfg   # (what use_minitriton_attention's hook sets during a forward)
        g = torch.Generator().manual_seed(0)
        for n in (5, 1):
            for layer in (0, 1):
                k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, dv, generator=g)
                k_out, v_out = cache.update(k, v, layer)
        assert (k_out.shape[2] == 0) == fused and v_out.shape[3] == dv, (dv, k_out.shape)
        if not fused:
            assert k_out.shape[2] == 6


def test_cache_pickles_after_fused_steps(model):
    """The cache keeps a memo of the last attention mask (a weak reference): torch.save and
    pickle leave it out, after fused steps over a padded batch too."""
    import io

    ids = torch.cat([_ids(10, seed=1), _ids(10, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = MiniCacheHF(model.config, window=1)
    cfg = model.config._attn_implementation
    try:
        use_minitriton_attention(model)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                           do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
    finally:
        model.set_attn_implementation(cfg)
    assert cache.fused_steps and cache._mask_memo is not None
    buf = io.BytesIO()
    torch.save(cache, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back._mask_memo is None and cache._mask_memo is not None
    for layer in range(L):
        k, v = cache.core.get(layer)
        k2, v2 = back.core.get(layer)
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_cache_with_more_layers_than_the_model_is_refused(model):
    """A MiniCacheHF built for more layers than the model has (its pairs past the last layer
    would never merge) is refused by cache_kwargs, and by the padding hook when the cache is
    passed directly; one of fewer layers at the first update past them."""
    ids = _ids(6)
    for cache in (MiniCacheHF(None, num_layers=L + 2), MiniCacheHF(None, [(L, L + 1)],
                                                                   num_layers=L + 2)):
        with pytest.raises(ValueError, match=f"cache: built for {L + 2} layers, but the model "
                                             f"has {L}"):
            cache_kwargs(model, cache)
        track_padding(model)
        name = next(iter(cache_kwargs(model, MiniCacheHF(model.config))))
        with pytest.raises(ValueError, match=f"built for {L + 2} layers"), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **{name: cache})
        assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="layer_idx"), torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, MiniCacheHF(None, num_layers=L - 1)))


def test_configs_without_a_layer_count_are_named():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="config: expected a model config with num_hidden_layers"):
        MiniCacheHF(object())
    for n in ("4", 4.7, 0):      # (a config object that does not check its own fields)
        cfg = SimpleNamespace(num_hidden_layers=n, hidden_size=32, num_attention_heads=2)
        with pytest.raises((TypeError, ValueError), match="config.num_hidden_layers"):
            MiniCacheHF(cfg)
    assert MiniCacheHF(SimpleNamespace(num_hidden_layers=4, hidden_size=32,
                                       num_attention_heads=2)).core.num_layers == 4
    cfg = SimpleNamespace(num_hidden_layers=4, hidden_size=32, num_attention_heads=2)
    assert MiniCacheHF(cfg, num_layers=4).core.num_layers == 4
    with pytest.raises(ValueError, match="num_layers: 40 does not match the config's "
                                         "num_hidden_layers=4"):
        MiniCacheHF(cfg, num_layers=40)


def test_mask_verdict_once_per_mask(model, monkeypatch):
    """The layers of a step share one mask: its verdict (a host sync on a GPU) is computed once
    per mask tensor, and again when the tensor is another one or was edited in place. The
    verdict: None when the mask hides nothing, each row's count of hidden first keys when it
    hides those alone (left padding), False otherwise."""
    from minitriton import hf

    calls = []
    real = hf._hidden_prefix
    monkeypatch.setattr(hf, "_hidden_prefix", lambda m: calls.append(1) or real(m))
    owner = MiniCacheHF(model.config)
    mask = torch.zeros(2, 1, 1, 9)
    assert all(hf._mask_verdict(mask, owner) is None for _ in range(L)) and len(calls) == 1
    mask[1, 0, 0, :2] = float("-inf")              # edited in place: a new version
    assert torch.equal(hf._mask_verdict(mask, owner), torch.tensor([0, 2])) and len(calls) == 2
    mask[0, 0, 0, 5] = torch.finfo(torch.float32).min           # a hole: not left padding
    assert hf._mask_verdict(mask, owner) is False and len(calls) == 3
    other = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    assert hf._mask_verdict(other, owner) is None and hf._mask_verdict(other, owner) is None
    assert len(calls) == 4
    assert hf._mask_verdict(None, owner) is None and hf._mask_verdict("causal", owner) is False
    with torch.inference_mode():               # no version counter: no memo, every call counts
        inf = torch.zeros(2, 1, 1, 9)
        assert hf._mask_verdict(inf, owner) is None and hf._mask_verdict(inf, owner) is None
        inf[0, 0, 0, 3] = float("-inf")
        assert hf._mask_verdict(inf, owner) is False
    assert len(calls) == 7
    left = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    left[0, ..., :6] = False
    left[2, ..., :1] = False
    assert torch.equal(hf._hidden_prefix(left), torch.tensor([6, 0, 1]))
    heads = torch.ones(2, 4, 1, 6, dtype=torch.bool)           # per-head masks: all or nothing
    assert hf._hidden_prefix(heads) is None
    heads[1, 2, 0, 0] = False
    assert hf._hidden_prefix(heads) is False
    # An additive mask hides its dtype's lowest value or -inf; a finite bias is no hiding: the
    # keys it weighs must be attended with it (restore + sdpa), even as a prefix.
    bias = torch.zeros(2, 1, 1, 6)
    bias[:, ..., :2] = torch.finfo(torch.float32).min
    bias[1, ..., 2] = float("-inf")
    assert torch.equal(hf._hidden_prefix(bias), torch.tensor([2, 3]))
    bias[:, ..., :2] = -2.0
    assert hf._hidden_prefix(bias) is False
    assert hf._hidden_prefix(torch.full((2, 3, 1, 6), 0.5)) is False


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_generate_with_padding_and_fused_decode(model, mode):
    """Left padding (a mask that hides each row's first cached tokens) under no_grad and
    inference_mode: decode steps run fused (the store's padding skipped) and generate what
    restore + sdpa does (both caches told of the padding)."""
    track_padding(model)
    ids = torch.cat([_ids(16, seed=8), _ids(16, seed=9)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs = []
    cfg = model.config._attn_implementation
    for fused in (False, True):
        cache = MiniCacheHF(model.config, window=4)
        try:
            if fused:
                use_minitriton_attention(model)
            with getattr(torch, mode)():
                outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                           min_new_tokens=5, do_sample=False, pad_token_id=0,
                                           **cache_kwargs(model, cache)))
        finally:
            model.set_attn_implementation(cfg)
    assert cache.fused_steps == 4 * 2 and cache.core.merged_pairs(3)[0].shape[2] > 0
    assert torch.equal(outs[0], outs[1])


def test_steps_that_need_gradients_attend_through_restore(model):
    """decode_attention is an inference kernel: with gradients enabled (or dropout), a
    one-token step over a merged layer attends through restore + sdpa, and backward works;
    the same step under no_grad runs fused, with the same logits."""
    ids, tok = _ids(20, seed=6), _ids(1, seed=7)
    cfg = model.config._attn_implementation
    use_minitriton_attention(model)
    try:
        caches = [MiniCacheHF(model.config, [PairSpec(2)], window=4) for _ in range(2)]
        with torch.no_grad():
            for c in caches:
                model(input_ids=ids, **cache_kwargs(model, c))
            fused = model(input_ids=tok, **cache_kwargs(model, caches[0])).logits
        assert caches[0].fused_steps == 2
        trained = model(input_ids=tok, **cache_kwargs(model, caches[1])).logits
        assert caches[1].fused_steps == 0 and trained.requires_grad
        trained.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(trained.detach(), fused, rtol=1e-4, atol=1e-4)
    finally:
        model.zero_grad(set_to_none=True)
        model.set_attn_implementation(cfg)


def test_models_that_cannot_be_merged_are_refused_up_front(model):
    """A head dim merge does not support is refused when the cache is built; states in a dtype
    it does not support are refused at the first layer, before anything is stored."""
    from transformers import LlamaConfig

    small = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="config: head dim 8"):
        MiniCacheHF(small, [(2, 3)])
    MiniCacheHF(small, [])                                   # a dense cache is fine
    MiniCacheHF(small, [PairSpec(2, method="mean")])         # and so is averaging
    cache = MiniCacheHF(model.config, [(2, 3)])
    k = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="k: dtype torch.float64"):
        cache.layers[0].update(k, k)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    assert cache.compression_ratio == 1.0                    # an empty cache


def test_transformers_without_torch_is_named():
    """transformers 5 disables itself for torch < 2.6: importing minitriton.hf says so."""
    import subprocess
    import sys

    code = ("import transformers.utils as u; u.is_torch_available = lambda: False\n"
            "import minitriton.hf")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ImportError: minitriton.hf: transformers" in proc.stderr
    assert "transformers 5 needs torch >= 2.6" in proc.stderr


def _left_padded(n_pad, seed=11):
    ids = torch.cat([_ids(14, seed=seed), _ids(14, seed=seed + 1)])
    mask = torch.ones_like(ids)
    ids[1, :n_pad], mask[1, :n_pad] = 0, 0
    return ids, mask


def test_track_padding_leaves_padding_out_of_retention(model):
    """With `track_padding`, the prefill merges a left-padded batch with its mask: the merged
    pairs are `merge(..., mask=)` of the model's own states, bit for bit, and retain no
    padding. The hook is installed once, hands positional masks over too, and leaves other
    caches alone."""
    ids, mask = _left_padded(5)
    with torch.no_grad():
        dense = DynamicCache()
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, dense))
        states = [(dense.layers[i].keys, dense.layers[i].values) if hasattr(dense, "layers")
                  else (dense.key_cache[i], dense.value_cache[i]) for i in (3, 4)]
        track_padding(model)
        handle = model._minitriton_padding_hook
        assert track_padding(model) is model and model._minitriton_padding_hook is handle
        cache = MiniCacheHF(model.config, [PairSpec(3, gamma=0.3)], window=4)
        model(ids, mask, **cache_kwargs(model, cache))       # (the mask given by position)
    assert torch.equal(cache.core.attention_mask, mask.bool())
    merged = cache.core.merged_pairs(3)
    for part, m in enumerate(merged):
        t = cache.plan.pairs[0].t
        want = minitriton.merge(states[0][part], states[1][part], t, 0.3, mask=mask)
        for name in ("e", "mag_prev", "mag_cur", "retained", "d_min", "d_max"):
            assert torch.equal(getattr(m, name), getattr(want, name)), name
        assert not m.retained[1, :, :5].any()
        unmasked = minitriton.merge(states[0][part], states[1][part], t, 0.3)
        assert not torch.equal(unmasked.retained, m.retained)   # (the padding would count)


def test_generate_left_padded_batch(model):
    """generate over a left-padded batch with a tracked cache: every forward hands its mask
    over (the last one covers the prompt and all but the newest token), no padding is
    retained, beam search's batch edits carry the mask, and a later forward without a mask
    clears it."""
    track_padding(model)
    ids, mask = _left_padded(6, seed=13)
    for beams in (2, 1):
        cache = MiniCacheHF(model.config, [PairSpec(3, gamma=0.3)], window=2)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, pad_token_id=0,
                                 num_beams=beams, **cache_kwargs(model, cache))
        assert out.shape == (2, 20)
        held = cache.core.attention_mask
        assert held.shape == (2 * beams, 19)
        assert torch.equal(held[:, :14], mask.repeat_interleave(beams, 0).bool())
        assert held[:, 14:].all()
        for m in cache.core.merged_pairs(3):
            assert not m.retained[beams:, :, :6].any() and m.retained[:beams].any()
    with torch.no_grad():
        model(input_ids=out[:, -1:], **cache_kwargs(model, cache))
    assert cache.core.attention_mask is None


def test_masks_of_any_dtype_are_read_as_transformers_reads_them(model):
    """transformers takes float (and bool) 2-D masks, nonzero for a token: so does the hook,
    and such masks give the merges of the integer mask."""
    track_padding(model)
    ids, mask = _left_padded(4, seed=17)
    pairs = []
    for m in (mask, mask.float(), mask.bool(), mask.to(torch.bfloat16)):
        cache = MiniCacheHF(model.config, [PairSpec(3, gamma=0.3)], window=2)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=m, max_new_tokens=3, min_new_tokens=3,
                           do_sample=False, pad_token_id=0, **cache_kwargs(model, cache))
        assert torch.equal(cache.core.attention_mask[:, :14], mask.bool())
        pairs.append(cache.core.merged_pairs(3)[0])
    for p in pairs[1:]:
        for name in ("e", "retained", "d_min", "d_max"):
            assert torch.equal(getattr(p, name), getattr(pairs[0], name)), name


def test_fused_decode_with_left_padding_matches_restore(model):
    """Fused decode steps over a left-padded batch whose padding fills a sink (row 2), spans
    the sink and the store (row 1) or is absent (row 0) give restore + sdpa's logits."""
    track_padding(model)
    ids = torch.cat([_ids(14, seed=s) for s in (20, 21, 22)])
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    plan = [PairSpec(1, gamma=0.2, sink=2), PairSpec(3, magnitude="projection")]
    plain = MiniCacheHF(model.config, plan, window=3)
    fused = MiniCacheHF(model.config, plan, window=3)
    cfg = model.config._attn_implementation
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, plain))
        try:
            use_minitriton_attention(model)
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, fused))
            for step in range(5):
                tok = torch.cat([_ids(1, seed=30 + 3 * step + r) for r in range(3)])
                mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                model.set_attn_implementation(cfg)
                a = model(input_ids=tok, attention_mask=mask, **cache_kwargs(model, plain)).logits
                use_minitriton_attention(model)
                b = model(input_ids=tok, attention_mask=mask, **cache_kwargs(model, fused)).logits
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        finally:
            model.set_attn_implementation(cfg)
    assert fused.fused_steps == 5 * 4 and plain.fused_steps == 0


def test_the_running_model_decides_fused_decode(model):
    """Markers go out only inside a forward of a model switched by use_minitriton_attention
    (its hook names the running model): not from the config the cache was built from, so a
    cache built, loaded or copied for a "minitriton" model and used by a model with another
    attention gets its states; and a cache built with config=None fuses."""
    import copy
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                          _attn_implementation=ATTENTION_NAME)

    def step(cache):
        g = torch.Generator().manual_seed(0)
        for n in (5, 1):
            for layer in (0, 1):
                k_out, _ = cache.update(torch.randn(1, 2, n, 16, generator=g),
                                        torch.randn(1, 2, n, 16, generator=g), layer)
        return k_out.shape[2]

    assert step(MiniCacheHF(cfg, [(0, 1)], window=1)) == 6          # no model running it
    hooked = MiniCacheHF(cfg, [(0, 1)], window=1)
    hooked._runner = cfg
    assert step(copy.deepcopy(hooked)) == 6 and step(hooked) == 0    # (copies leave it out)

    ids = _ids(9, seed=4)
    cache = MiniCacheHF(None, num_layers=L, window=2)
    cfg_attn = model.config._attn_implementation
    try:
        use_minitriton_attention(model)
        out = _generate(model, ids, cache, n=4)
        assert cache.fused_steps == 3 * 2 and cache._runner is None   # (3 steps x 2 layers)
        with torch.no_grad():   # the model's forward called directly, and its decoder: seen too
            for step, call in enumerate((model.forward, model.get_decoder())):
                call(input_ids=_ids(1, seed=20 + step), **cache_kwargs(model, cache))
                assert cache.fused_steps == (4 + step) * 2 and cache._runner is None
    finally:
        model.set_attn_implementation(cfg_attn)
    assert torch.equal(out, _generate(model, ids, MiniCacheHF(model.config, window=2), n=4))


def test_markers_must_reach_the_attention_as_given(model):
    """A model that hands the attention function other values than the cache returned (e.g.
    split in halves) is refused at its first fused step, by name, instead of attending to the
    cache's own values; DiffLlama and Doge, whose attention uses the returned states outside
    the attention function, are refused up front."""
    from types import SimpleNamespace

    from minitriton.hf import minitriton_attention

    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                          _attn_implementation=ATTENTION_NAME)
    cache = MiniCacheHF(cfg, [(0, 1)], window=1)
    cache._runner = cfg
    g = torch.Generator().manual_seed(0)
    for n in (5, 1):
        for layer in (0, 1):
            k, v = cache.update(torch.randn(1, 2, n, 16, generator=g),
                                torch.randn(1, 2, n, 16, generator=g), layer)
    q = torch.randn(1, 2, 1, 16, generator=g)
    out, _ = minitriton_attention(SimpleNamespace(), q, k, v, None, scaling=0.25)
    assert out.shape == (1, 1, 2, 16)
    with pytest.raises(ValueError, match="value: the 'minitriton' attention got the cache's"):
        minitriton_attention(SimpleNamespace(), q, k, v[..., :8], None, scaling=0.25)
    for kind in ("diffllama", "doge"):
        fake = torch.nn.Linear(1, 1)
        fake.config = SimpleNamespace(model_type=kind)
        with pytest.raises(ValueError, match=f"model: its attention \\('{kind}'\\) uses"):
            use_minitriton_attention(fake)


def test_layers_that_share_states_stay_out_of_the_plan():
    """A model whose last num_kv_shared_layers layers reuse earlier layers' states (Gemma 3n)
    never updates them: the default plan is the paper's over the other layers, and a plan with
    a pair that includes one is refused by name."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_hidden_layers=10, num_kv_shared_layers=4, hidden_size=64,
                          num_attention_heads=4)
    assert [s.layers for s in MiniCacheHF(cfg).plan] == [(3, 4)]
    assert [s.layers for s in MiniCacheHF(cfg, [(0, 1), (4, 5)]).plan] == [(0, 1), (4, 5)]
    with pytest.raises(ValueError, match=r"plan: layers \[6\] never update the cache .*"
                                         r"num_kv_shared_layers=4"):
        MiniCacheHF(cfg, [(5, 6)])


def test_per_layer_config_attributes_are_not_fatal():
    """A config that raises for an attribute varying across layers (Gemma 4's per-layer
    configs raise a non-AttributeError) is read as not giving it."""
    class PerLayer:
        num_hidden_layers, model_type = 4, "llama"

        @property
        def head_dim(self):
            raise RuntimeError("'head_dim' is a per-layer attribute")

    cache = MiniCacheHF(PerLayer(), [(0, 1)])
    assert [s.layers for s in cache.plan] == [(0, 1)]


def test_pairs_of_layers_of_other_shapes_are_refused_up_front():
    """Head dims and KV heads read per layer where the config gives them per layer (Gemma 4's
    `per_layer_config`): a pair joining layers of two shapes, or a slerp pair whose head dim
    merge does not support, is refused when the cache is built, naming the layers."""
    from types import SimpleNamespace

    dims, kv = [16, 16, 16, 16, 512, 512, 16, 32], [2, 2, 2, 1, 2, 2, 2, 2]

    class PerLayer:
        num_hidden_layers, model_type = 8, "llama"
        per_layer_config = [SimpleNamespace(head_dim=d, num_key_value_heads=h)
                            for d, h in zip(dims, kv)]

        @property
        def head_dim(self):
            raise RuntimeError("'head_dim' is a per-layer attribute")

    cfg = PerLayer()
    assert [s.layers for s in MiniCacheHF(cfg, [(0, 1)]).plan] == [(0, 1)]
    MiniCacheHF(cfg, [PairSpec(4, method="mean")])      # averaging has no head dim limit
    with pytest.raises(ValueError, match=r"config: head dim 512 \(layer 4\) cannot be merged"):
        MiniCacheHF(cfg, [(4, 5)])
    for plan, message in (([(2, 3)], r"\(KV heads 2 in layer 2, 1 in layer 3\)"),
                          ([(5, 6)], r"\(head dim 512 in layer 5, 16 in layer 6\)"),
                          ([PairSpec(6, method="mean")], r"\(head dim 16 in layer 6, 32 in")):
        with pytest.raises(ValueError, match=r"plan: pair \(\d, \d\) joins layers of "
                                             r"different shapes " + message):
            MiniCacheHF(cfg, plan)


def test_gemma4_default_plan_is_refused_by_its_shapes():
    """On a real Gemma 4 config (head dim 16 on sliding layers, 512 on full-attention ones) the
    default plan pairs a sliding layer with a full one: refused at build, before any forward."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("Gemma 4 is not in this transformers release")
    cfg = transformers.Gemma4TextConfig(
        hidden_size=96, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=512, intermediate_size=128, vocab_size=100,
        vocab_size_per_layer_input=100, hidden_size_per_layer_input=8, sliding_window=64)
    with pytest.raises(ValueError, match=r"plan: pair \(4, 5\) joins layers of different "
                                         r"shapes \(head dim 16 in layer 4, 512 in layer 5\)"):
        MiniCacheHF(cfg)
    assert [s.layers for s in MiniCacheHF(cfg, [(2, 3)]).plan] == [(2, 3)]


def test_the_running_model_is_forgotten_after_a_failed_forward():
    """The hook that names the running model to the cache is undone when the forward raises."""
    from types import SimpleNamespace

    class Failing(torch.nn.Module):
        config = SimpleNamespace(num_hidden_layers=2, _attn_implementation=ATTENTION_NAME)

        def forward(self, input_ids=None, past_key_values=None):
            assert past_key_values._runner is self.config
            raise RuntimeError("boom")

    model = track_padding(Failing())
    cache = MiniCacheHF(None, [], num_layers=2)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=torch.ones(1, 2), past_key_values=cache)
    assert cache._runner is None


def test_nested_forwards_restore_the_running_model():
    """A hooked module called inside another's forward with the same cache hands the running
    model back to the outer forward when it returns."""
    from types import SimpleNamespace

    outer_cfg = SimpleNamespace(num_hidden_layers=2, _attn_implementation=ATTENTION_NAME)
    seen = []

    class Inner(torch.nn.Module):
        config = SimpleNamespace(num_hidden_layers=2, _attn_implementation="sdpa")

        def forward(self, input_ids=None, past_key_values=None):
            seen.append(past_key_values._runner)

    class Outer(torch.nn.Module):
        config = outer_cfg

        def __init__(self):
            super().__init__()
            self.inner = track_padding(Inner())

        def forward(self, input_ids=None, past_key_values=None):
            self.inner(input_ids=input_ids, past_key_values=past_key_values)
            seen.append(past_key_values._runner)

    cache = MiniCacheHF(None, [], num_layers=2)
    track_padding(Outer())(input_ids=torch.ones(1, 2), past_key_values=cache)
    assert seen == [Inner.config, outer_cfg] and cache._runner is None
