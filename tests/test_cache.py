"""The framework-neutral MiniCache KV cache: no token lost, exact lengths, bytes, chunk
boundaries and the chunk retention rule, W = 1, plans, edits."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import minitriton
from minitriton.cache import MergePlan, MiniCache, PairSpec
from minitriton.reference import merge_ref

B, H, D = 2, 2, 16


def _states(L, S, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, H, S, D, generator=g, dtype=torch.float32).to(dtype) for _ in range(L)],
            [torch.randn(B, H, S, D, generator=g, dtype=torch.float32).to(dtype) for _ in range(L)])


def _feed(cache, ks, vs, schedule):
    """Feed states of all layers, one forward per entry of `schedule` (token counts)."""
    pos = 0
    for n in schedule:
        for layer in range(cache.num_layers):
            cache.update(layer, ks[layer][:, :, pos:pos + n], vs[layer][:, :, pos:pos + n])
        pos += n
        for layer in range(cache.num_layers):
            assert cache.seq_len(layer) == pos
    return pos


def _expected(spec, kp, kc, vp, vc, prompt, window, total, mask=None):
    """sink + (prompt chunk, then W-chunks merged with d_range) + tail, computed independently
    (`mask`: bool `[B, total]`, False for padding; a row's first `sink` tokens past the sink
    positions are kept as they are)."""
    s = spec.sink
    keep = None
    if mask is not None:
        keep = torch.zeros_like(mask)
        for b in range(mask.shape[0]):
            tokens = torch.nonzero(mask[b]).flatten()[:s]
            keep[b, tokens[tokens >= s]] = True
    bounds = [s, max(prompt, s)]
    # Decoded tokens are merged in whole W-chunks once the next forward starts; the last
    # forward's tokens (one here) always stay in the tail.
    while bounds[-1] + window <= total - 1:
        bounds.append(bounds[-1] + window)
    out = {}
    for name, a, b in (("k", kp, kc), ("v", vp, vc)):
        m = None
        for lo, hi in zip(bounds, bounds[1:]):
            if hi <= lo:
                continue
            rng = None if m is None else (m.d_min, m.d_max)
            new = minitriton.merge(a[:, :, lo:hi], b[:, :, lo:hi], spec.t, spec.gamma,
                                   spec.magnitude, d_range=rng,
                                   mask=None if mask is None else mask[:, lo:hi],
                                   keep=None if keep is None else keep[:, lo:hi])
            m = new if m is None else minitriton.MergedPair.cat([m, new])
        rp, rc = minitriton.restore(m)
        end = bounds[-1]
        out[name] = (torch.cat([a[:, :, :s], rp, a[:, :, end:total]], 2),
                     torch.cat([b[:, :, :s], rc, b[:, :, end:total]], 2), m)
    return out


@pytest.mark.parametrize("window,sink,magnitude", [(1, 0, "norm"), (4, 3, "projection"),
                                                   (7, 0, "norm")])
def test_no_token_lost_across_window_boundaries(window, sink, magnitude):
    L, prompt, steps = 5, 9, 23
    ks, vs = _states(L, prompt + steps, seed=window)
    cache = MiniCache(L, [PairSpec(1, magnitude=magnitude, sink=sink, gamma=0.2)], window=window)
    total = _feed(cache, ks, vs, [prompt] + [1] * steps)
    for layer in (0, 3, 4):   # unmerged layers: exact
        k, v = cache.get(layer)
        assert torch.equal(k, ks[layer]) and torch.equal(v, vs[layer])
    exp = _expected(cache.plan.pairs[0], ks[1], ks[2], vs[1], vs[2], prompt, window, total)
    for side, layer in ((0, 1), (1, 2)):
        k, v = cache.get(layer)
        assert k.shape == (B, H, total, D) and v.shape == (B, H, total, D)
        torch.testing.assert_close(k, exp["k"][side], rtol=0, atol=0)
        torch.testing.assert_close(v, exp["v"][side], rtol=0, atol=0)
    # the tail keeps fewer than W decoded tokens plus the current one
    tail = total - max(prompt, sink) - (exp["k"][2].shape[2] - max(prompt - sink, 0))
    assert 1 <= tail <= window


def test_w1_is_per_token_merging():
    L, prompt, steps = 2, 6, 10
    ks, vs = _states(L, prompt + steps, seed=3)
    cache = MiniCache(L, [(0, 1)], window=1)
    pos = prompt
    _feed(cache, ks, vs, [prompt])
    for _ in range(steps):
        for layer in range(L):
            cache.update(layer, ks[layer][:, :, pos:pos + 1], vs[layer][:, :, pos:pos + 1])
        pos += 1
        mk, _ = cache.merged_pairs(0)
        assert mk.shape[2] == pos - 1          # everything but the current token is merged


def test_chunk_retention_rule_uses_extremes_so_far():
    """A token of a later chunk is retained iff d > dmax - (dmax - dmin) * gamma with the
    extremes over every token merged so far, itself included; earlier decisions stay."""
    L, prompt, steps, gamma = 2, 8, 12, 0.3
    ks, vs = _states(L, prompt + steps + 1, seed=5)
    cache = MiniCache(L, [PairSpec(0, gamma=gamma)], window=1)
    _feed(cache, ks, vs, [prompt] + [1] * (steps + 1))
    mk, mv = cache.merged_pairs(0)
    n = mk.shape[2]
    for m, x in ((mk, ks), (mv, vs)):
        d = merge_ref(x[0][:, :, :n], x[1][:, :, :n], 0.6, gamma)["d"]   # [B, H, n]
        got = m.retained.numpy()
        for s in range(prompt, n):
            lo, hi = d[..., :s + 1].min(-1), d[..., :s + 1].max(-1)
            want = d[..., s] > hi - (hi - lo) * gamma
            # float32 kernels against the float64 oracle: skip ties at the threshold
            near = abs(d[..., s] - (hi - (hi - lo) * gamma)) < 1e-5
            assert ((got[..., s] == want) | near).all(), f"token {s}"
        # the prompt chunk used its own extremes only
        lo, hi = d[..., :prompt].min(-1, keepdims=True), d[..., :prompt].max(-1, keepdims=True)
        want = d[..., :prompt] > hi - (hi - lo) * gamma
        assert (got[..., :prompt] == want).all()


def test_arrival_grouping_does_not_change_the_store():
    """Tokens decoded one by one or in multi-token forwards give the same cache."""
    L, total = 4, 40
    ks, vs = _states(L, total, seed=7)
    a = MiniCache(L, [(2, 3)], window=5, sink=2)
    b = MiniCache(L, [(2, 3)], window=5, sink=2)
    _feed(a, ks, vs, [10] + [1] * 29 + [1])
    _feed(b, ks, vs, [10, 13, 3, 1, 12, 1])
    for layer in range(L):
        for x, y in zip(a.get(layer), b.get(layer)):
            assert torch.equal(x, y)
    assert a.nbytes == b.nbytes


def test_bytes_count_everything_held():
    L = 4
    ks, vs = _states(L, 30, seed=1)
    cache = MiniCache(L, [PairSpec(0, sink=2), PairSpec(2, method="mean")], window=4)
    total = _feed(cache, ks, vs, [20] + [1] * 10)
    mk, mv = cache.merged_pairs(0)
    p = cache._pairs[0]
    held = sum(x.numel() * x.element_size() for x in p.tensors())
    assert cache.layer_nbytes(0) + cache.layer_nbytes(1) == held
    assert held == mk.nbytes + mv.nbytes + sum(
        x.numel() * x.element_size() for x in (*p.sink_k, *p.sink_v, *p.tail_k, *p.tail_v))
    dense_layer = 2 * B * H * total * D * 4
    assert all(cache.layer_dense_nbytes(i) == dense_layer for i in range(L))
    assert cache.dense_nbytes == L * dense_layer
    assert cache.nbytes == sum(cache.layer_nbytes(i) for i in range(L))
    assert cache.compression_ratio == pytest.approx(cache.dense_nbytes / cache.nbytes)
    assert 1.0 < cache.compression_ratio < 2.0
    # the mean pair holds one average per token, and returns it for both layers
    k2, v2 = cache.get(2)
    k3, v3 = cache.get(3)
    p_mean = cache._pairs[2]
    n = p_mean.merged_len()
    assert n == 28 and p_mean.mean_v.shape[2] == n           # 20 + two W-chunks of 4
    torch.testing.assert_close(k2[:, :, :n], (ks[2][:, :, :n] + ks[3][:, :, :n]) / 2)
    torch.testing.assert_close(v3[:, :, :n], (vs[2][:, :, :n] + vs[3][:, :, :n]) / 2)
    assert torch.equal(k2[:, :, :n], k3[:, :, :n]) and torch.equal(v2[:, :, :n], v3[:, :, :n])
    stats = cache.stats()
    assert [s["layer"] for s in stats] == list(range(L)) and stats[1]["pair"].startswith("(0,1)")
    assert repr(cache) == (f"MiniCache(num_layers={L}, pairs=2, window=4, batch={B}, "
                           f"seq_len={total}, nbytes={cache.nbytes}, "
                           f"compression_ratio={cache.compression_ratio:.3f})")


def test_keys_or_values_alone(monkeypatch):
    """get_keys / get_values equal get()'s parts on every kind of layer (dense, slerp pair with
    sink and tail, mean pair, a prev layer waiting for its pair) and restore only what they
    return."""
    L = 6
    ks, vs = _states(L, 30, seed=2)
    cache = MiniCache(L, [PairSpec(0, sink=2), PairSpec(2, method="mean")], window=4)
    _feed(cache, ks, vs, [20] + [1] * 10)
    restored = []
    real = minitriton.cache.restore
    monkeypatch.setattr(minitriton.cache, "restore",
                        lambda m, layer=None: restored.append(m) or real(m, layer))
    for layer in range(L):
        k, v = cache.get(layer)
        restored.clear()
        assert torch.equal(cache.get_keys(layer), k)
        assert all(m is cache.merged_pairs(0)[0] for m in restored)
        assert len(restored) == (layer in (0, 1))
        restored.clear()
        assert torch.equal(cache.get_values(layer), v)
        assert all(m is cache.merged_pairs(0)[1] for m in restored)
        assert len(restored) == (layer in (0, 1))
    # layer 4 of a (4, 5) pair mid-prefill: its own states, as get() returns them
    cache2 = MiniCache(L, [(4, 5)])
    cache2.update(4, ks[4][:, :, :7], vs[4][:, :, :7])
    assert torch.equal(cache2.get_keys(4), ks[4][:, :, :7])
    assert torch.equal(cache2.get_values(4), vs[4][:, :, :7])
    with pytest.raises(ValueError, match="layer"):
        cache.get_keys(L)


def _snapshot(cache):
    """Everything a cache holds, per layer, plus its lengths and bytes."""
    return ([cache.get(i) for i in range(cache.num_layers)],
            [cache.seq_len(i) for i in range(cache.num_layers)], cache.nbytes)


def _same(a, b):
    (ga, la, na), (gb, lb, nb) = a, b
    assert la == lb and na == nb
    for (ka, va), (kb, vb) in zip(ga, gb):
        for x, y in ((ka, kb), (va, vb)):
            assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("method", ["slerp", "mean"])
def test_rejected_update_leaves_the_cache_as_it_was(method):
    """A bad update (unsupported dtype, dtype, device or shape unlike the states held, head
    dim out of range) raises a named error before anything is stored: at prefill, between the
    two layers of a pair, and during decode; the cache then goes on as if it never happened."""
    L = 4
    ks, vs = _states(L, 12, seed=11)
    cache = MiniCache(L, [PairSpec(1, method=method, sink=2)], window=2)
    ref = MiniCache(L, [PairSpec(1, method=method, sink=2)], window=2)
    bad = {
        "float64": (TypeError, "k: dtype torch.float64",
                    lambda k, v: (k.double(), v)),
        "v dtype": (TypeError, "v has dtype torch.float16",
                    lambda k, v: (k, v.half())),
        "heads": (ValueError, "k of shape",
                  lambda k, v: (k[:, :1], v[:, :1])),
        "head dim": (ValueError, "v: head dim",
                     lambda k, v: (k, torch.zeros(*v.shape[:3], 8))),
        "int": (TypeError, "k: dtype torch.int64",
                lambda k, v: (k.long(), v)),
    }

    def feed(c, layer, lo, hi, spoil=None):
        k, v = ks[layer][:, :, lo:hi], vs[layer][:, :, lo:hi]
        return c.update(layer, *(spoil(k, v) if spoil else (k, v)))

    def step(lo, hi):
        for layer in range(L):
            # every kind of bad state, at every layer of the step, before the good one: for a
            # slerp pair any of them; for a dense layer, a "mean" pair (which averages any
            # states), or the very first states of a pair, only what contradicts states held
            held = lo > 0 or layer == 2
            for exc, msg, spoil in bad.values():
                unlike_held = msg.startswith(("k of", "v has"))
                mergeable = layer in (1, 2) and method == "slerp"
                if (mergeable and (held or not unlike_held)) or (held and unlike_held):
                    before = _snapshot(cache)
                    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
                        feed(cache, layer, lo, hi, spoil)
                    _same(before, _snapshot(cache))
            feed(cache, layer, lo, hi)
            feed(ref, layer, lo, hi)

    step(0, 6)                       # prefill: layer 1 pending, then the pair merged
    for pos in range(6, 12):         # decode: tails, chunks of W = 2 merged
        step(pos, pos + 1)
    _same(_snapshot(ref), _snapshot(cache))


def test_a_merge_that_fails_midway_loses_nothing(monkeypatch):
    """A merge that raises (out of memory, say) between the keys and the values, at prefill or
    in the second of two chunks of a flush: nothing is half stored, no token is lost or
    duplicated, and the same update then goes through as if it had never failed."""
    import minitriton.cache as cache_mod

    L = 2
    ks, vs = _states(L, 16, seed=13)
    cache, ref = (MiniCache(L, [(0, 1)], window=2) for _ in range(2))
    real, calls = cache_mod.merge, {"n": 0, "fail_at": None}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "merge", flaky)

    def forward(lo, hi, fail_at=None):
        for layer in range(L):
            k, v = ks[layer][:, :, lo:hi], vs[layer][:, :, lo:hi]
            calls["fail_at"] = None
            ref.update(layer, k, v)
            calls["n"], calls["fail_at"] = 0, fail_at
            try:
                cache.update(layer, k, v)
            except RuntimeError as exc:
                assert "simulated" in str(exc) and layer == {2: 1, 3: 0}[fail_at]
                failed.append(lo)
                calls["fail_at"] = None
                cache.update(layer, k, v)              # the retry goes through
            for i in range(L):
                assert cache.seq_len(i) == ref.seq_len(i)

    failed = []
    forward(0, 6, fail_at=2)          # the values' merge of the prefill fails (at layer 1)
    forward(6, 11)                    # a 5-token forward: the tails now hold 5 tokens
    forward(11, 12, fail_at=3)        # flush (at layer 0): chunk 1 merges, chunk 2's keys fail
    forward(12, 13)
    assert failed == [0, 11]
    _same(_snapshot(ref), _snapshot(cache))


def test_layer_and_edit_arguments():
    import numpy as np

    L = 3
    ks, vs = _states(L, 5, seed=1)
    cache = MiniCache(L, [(1, 2)])
    for layer in range(L):
        cache.update(np.int64(layer), ks[layer], vs[layer])        # numpy ints are ints
    assert cache.seq_len(np.int32(2)) == 5
    assert torch.equal(cache.get_keys(np.int64(0)), ks[0])
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError, match="layer"):
            cache.get(bad)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="layer"):
            cache.seq_len(bad)
    with pytest.raises(ValueError, match="layer"):
        cache.layer_nbytes(7)
    with pytest.raises(TypeError, match="index"):
        cache.select_batch(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="index"):
        cache.select_batch([0, 1])
    with pytest.raises(ValueError, match="index"):
        cache.select_batch(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="length"):
        cache.crop(2.0)
    with pytest.raises(ValueError, match="length"):
        cache.crop(-1)
    cache.crop(np.int64(3))
    assert cache.seq_len(0) == 3 and cache.seq_len(1) == 3


def test_empty_plan_is_dense():
    L = 3
    ks, vs = _states(L, 12, seed=2)
    cache = MiniCache(L, [])
    _feed(cache, ks, vs, [5, 1, 6])
    assert cache.nbytes == cache.dense_nbytes and cache.compression_ratio == 1.0
    assert cache.retained_fraction() is None
    for layer in range(L):
        assert torch.equal(cache.get(layer)[0], ks[layer])


def test_prefill_returns_exact_states_and_keeps_no_dense_copy():
    L = 2
    ks, vs = _states(L, 16, seed=4)
    cache = MiniCache(L, [(0, 1)])
    k0, v0 = cache.update(0, ks[0], vs[0])
    assert k0 is ks[0]                               # held until layer 1 arrives
    assert cache.layer_nbytes(0) == 2 * ks[0].numel() * 4
    k1, _ = cache.update(1, ks[1], vs[1])
    assert k1 is ks[1]
    p = cache._pairs[0]
    assert p.pending is None and p.tail_k == [None, None]
    assert cache.nbytes < cache.dense_nbytes


def test_crop_and_select_batch():
    L = 4
    ks, vs = _states(L, 30, seed=6)
    cache = MiniCache(L, [PairSpec(0, sink=3, gamma=0.3)], window=4)
    _feed(cache, ks, vs, [12] + [1] * 10)
    before = [cache.get(i) for i in range(L)]
    idx = torch.tensor([1, 0, 1])
    cache.select_batch(idx)
    for i in range(L):
        assert torch.equal(cache.get(i)[0], before[i][0][idx])
    for n in (20, 10, 2):
        cache.crop(n)
        for i in range(L):
            assert cache.seq_len(i) == n
            assert torch.equal(cache.get(i)[1], before[i][1][idx][:, :, :n])


def _held_tensors(cache):
    """Every tensor the cache holds (dense layers, each pair's parts and stores)."""
    out = [x for store in (cache._dense_k, cache._dense_v) for x in store if x is not None]
    for pair in cache._pairs.values():
        out += [x for x in pair.tensors() if x is not None]
    return out


def test_crops_keep_no_memory_of_the_cut_tokens():
    """After a crop (and a batch edit) the cache's tensors own just what they hold: their
    memory adds up to `nbytes`, and the cache pickles to about that much, not to the memory of
    the tokens cut."""
    import io

    L, S, D = 4, 500, 64
    for B, plan in ((1, [PairSpec(1)]), (2, [PairSpec(1, sink=3)]),
                    (1, [PairSpec(1, method="mean")])):
        cache = MiniCache(L, plan, window=1)
        g = torch.Generator().manual_seed(B)
        for layer in range(L):
            x = torch.randn(B, 2, S, D, generator=g)
            cache.update(layer, x, x)
        for edit in (lambda: cache.crop(10), lambda: cache.select_batch(torch.tensor([0])),
                     lambda: cache.crop(4)):
            edit()
            held = _held_tensors(cache)
            assert sum(x.untyped_storage().nbytes() for x in held) == cache.nbytes, plan
            buf = io.BytesIO()
            torch.save(cache, buf)
            assert len(buf.getvalue()) < cache.nbytes + 32768, plan


def test_a_store_cropped_to_nothing_follows_the_batch_rows():
    """A pair's store cropped to no token keeps its rows' d extremes (for the chunks to come):
    a batch edit moves them with the rows, as it would before the crop."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 6, 16, generator=g), torch.randn(2, 1, 6, 16, generator=g)
    y[1] = x[1] + 0.01 * y[1]          # row 1 nearly parallel: far smaller extremes

    def prefilled():
        cache = MiniCache(2, [PairSpec(0, gamma=0.5)], window=1)
        cache.update(0, x, x)
        cache.update(1, y, y)
        return cache

    one = prefilled()
    one.crop(0)
    one.select_batch(torch.tensor([1]))
    assert one.batch_size() == 1
    assert torch.equal(one.merged_pairs(0)[0].d_max, prefilled().merged_pairs(0)[0].d_max[1:])
    one.update(0, x[1:], x[1:])                   # a batch of one is accepted
    a, b = prefilled(), prefilled()
    a.crop(0)
    a.select_batch(torch.tensor([1, 0]))
    b.select_batch(torch.tensor([1, 0]))
    b.crop(0)
    z = torch.randn(2, 1, 6, 16, generator=g)
    for cache in (a, b):
        cache.update(0, x, x)
        cache.update(1, z, z)
    for name in ("d_min", "d_max", "retained", "e"):
        assert torch.equal(getattr(a.merged_pairs(0)[0], name),
                           getattr(b.merged_pairs(0)[0], name)), name


def test_plans():
    assert [s.layers for s in MergePlan.paper(30)] == [(15, 16), (17, 18), (19, 20), (21, 22),
                                                       (23, 24), (25, 26), (27, 28)]
    assert [s.layers for s in MergePlan.paper(7)] == [(3, 4), (5, 6)]
    assert len(MergePlan.paper(1)) == 0
    plan = MergePlan([PairSpec(4, t=1.0, gamma=0.2, magnitude="projection", sink=4), (0, 1)],
                     t=0.5)
    assert [s.prev for s in plan] == [0, 4] and plan.pairs[0].t == 0.5
    assert MergePlan.from_json(plan.to_json()) == plan
    assert plan.lookup(5) == (plan.pairs[1], 1) and plan.lookup(2) is None
    with pytest.raises(ValueError, match="adjacent"):
        MergePlan([(0, 2)])
    with pytest.raises(ValueError, match="overlap"):
        MergePlan([(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="out of range"):
        MergePlan([(3, 4)], num_layers=4)
    with pytest.raises(ValueError, match="magnitude"):
        MergePlan([PairSpec(0, magnitude="abs")])
    with pytest.raises(ValueError, match="gamma"):
        MergePlan([PairSpec(0, gamma=math.nan)])


def test_bad_updates():
    cache = MiniCache(4, [(0, 1)], window=2)
    k = torch.randn(1, 2, 3, D)
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 4\) \(the cache was "
                                         r"built for 4 layers\), got 4"):
        cache.update(4, k, k)
    with pytest.raises(ValueError, match="v:"):
        cache.update(2, k, k[:, :, :2])
    with pytest.raises(ValueError, match="window"):
        MiniCache(4, window=0)
    with pytest.raises(ValueError, match=r"layer: layer 1 got 3 new tokens, but layer 0, the "
                                         r"first layer of its merged pair, holds 0 and this "
                                         r"one 0 \(a step updates layer 0 first"):
        cache.update(1, k, k)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match=r"layer: layer 0 was updated twice before layer 1, "
                                         r".*after a forward that failed between the two, "
                                         r"reset\(\) the cache"):
        cache.update(0, k, k)
    waiting = copy.deepcopy(cache)            # (the advice holds: reset, then a fresh start)
    waiting.reset()
    waiting.update(0, k, k)
    assert waiting.seq_len(0) == 3
    with pytest.raises(ValueError, match="must match"):
        cache.update(1, k[:, :, :2], k[:, :, :2])
    cache.update(1, k, k)
    cache.update(0, k[:, :, :1], k[:, :, :1])       # a decode step, layer 0 first
    with pytest.raises(ValueError, match="layer 1 got 2 new tokens, but layer 0, .* holds 4 "
                                         "and this one 3"):
        cache.update(1, k[:, :, :2], k[:, :, :2])
    assert cache.seq_len(1) == 3      # (a refused update stores nothing)


@pytest.mark.parametrize("window,sink", [(1, 0), (3, 2)])
def test_callers_buffers_may_be_reused(window, sink):
    """A decoder that writes every layer's states into one buffer, step after step, gets what
    fresh tensors give: the cache never holds the caller's memory."""
    L, prompt, steps = 4, 6, 5
    ks, vs = _states(L, prompt + steps, seed=23)
    plan = [PairSpec(1, gamma=0.3, sink=sink)]
    fresh = MiniCache(L, plan, window=window)
    _feed(fresh, ks, vs, [prompt] + [1] * steps)
    reused = MiniCache(L, plan, window=window)
    pos = 0
    for n in [prompt] + [1] * steps:
        kbuf, vbuf = torch.empty(B, H, n, D), torch.empty(B, H, n, D)
        for layer in range(L):
            kbuf.copy_(ks[layer][:, :, pos:pos + n])
            vbuf.copy_(vs[layer][:, :, pos:pos + n])
            reused.update(layer, kbuf, vbuf)
        kbuf.fill_(float("nan"))
        vbuf.fill_(float("nan"))
        pos += n
    for layer in range(L):
        for got, want in zip(reused.get(layer), fresh.get(layer)):
            assert torch.equal(got, want), layer


def test_edits_are_checked_before_anything_changes():
    """crop / select_batch in the middle of a pair's prefill, or with out-of-range rows, raise
    and leave every layer as it was."""
    L = 4
    ks, vs = _states(L, 8, seed=3)
    cache = MiniCache(L, [(2, 3)])
    for layer in range(3):                                   # layer 2 waits for layer 3
        cache.update(layer, ks[layer], vs[layer])
    before = _snapshot(cache)
    for edit in (lambda: cache.crop(3), lambda: cache.select_batch(torch.tensor([1, 0]))):
        with pytest.raises(RuntimeError, match="middle of its prefill"):
            edit()
        _same(before, _snapshot(cache))
    cache.update(3, ks[3], vs[3])
    before = _snapshot(cache)
    for bad in ([0, B], [-B - 1]):
        with pytest.raises(ValueError, match="index: batch rows"):
            cache.select_batch(torch.tensor(bad))
        _same(before, _snapshot(cache))
    cache.select_batch(torch.tensor([-1, 0]))                # negative rows count from the end
    assert torch.equal(cache.get(0)[0], ks[0][[1, 0]])


def test_plans_take_numpy_numbers_and_check_json():
    import json

    import numpy as np

    plan = MergePlan([(np.int64(1), np.int64(2)), PairSpec(np.int32(4), t=np.float32(0.25),
                                                           sink=np.int64(2))],
                     gamma=np.float64(0.1), num_layers=np.int64(6))
    assert [type(s.prev) for s in plan] == [int, int] and plan.pairs[1].t == 0.25
    assert json.loads(plan.to_json()) and MergePlan.from_json(plan.to_json()) == plan
    assert MergePlan.from_json("[[1, 2], {\"prev\": 4, \"t\": 0.25, \"sink\": 2}]",
                               num_layers=6) == MergePlan([(1, 2), PairSpec(4, t=0.25, sink=2)],
                                                          gamma=0.05)
    cache = MiniCache(np.int64(6), plan, window=np.int64(4))
    assert cache.num_layers == 6 and cache.window == 4
    for text, match in (('{"x": 1}', "text: expected"), ("3", "text: expected"),
                        ('[{"prev": 1, "tee": 0.5}]', "pairs\\[0\\]: expected PairSpec fields"),
                        ('[{"t": 0.5}]', "pairs\\[0\\]: expected PairSpec fields"),
                        ('[{"prev": 3}, {"prev": 7, "gamma": 1.5}]',
                         r"pairs\[1\]: gamma: expected a value in \[0, 1\], got 1.5"),
                        ("[" * 100000 + "]" * 100000, "text: JSON nested too deeply")):
        with pytest.raises(ValueError, match=match):
            MergePlan.from_json(text)
    with pytest.raises(ValueError, match=r"pairs\[1\]: expected layer indices >= 0, got "
                                         r"\(-1, 0\)"):
        MergePlan([(2, 3), (-1, 0)])
    with pytest.raises(TypeError, match=r"pairs\[0\]: sink: expected an int"):
        MergePlan([{"prev": 2, "sink": 1.5}])
    with pytest.raises(ValueError, match="num_layers"):
        MergePlan.paper(-4)
    with pytest.raises(TypeError, match="num_layers"):
        MergePlan.paper("30")
    with pytest.raises(TypeError, match="pairs: expected an iterable"):
        MergePlan(3)
    with pytest.raises(TypeError, match="prev"):
        PairSpec(1.0).check()
    with pytest.raises(TypeError, match="num_layers"):
        MiniCache(4.0)
    with pytest.raises(ValueError, match="window"):
        MiniCache(4, window=np.int64(0))
    with pytest.raises(TypeError, match="window: expected an int >= 1, got bool"):
        MiniCache(4, window=True)
    assert MiniCache(2, []).compression_ratio == 1.0


def test_a_cache_of_no_tokens_compresses_by_one():
    """Fresh, or cropped to nothing (its stores still hold their d extremes): compression 1.0,
    in total and per layer."""
    L = 4
    ks, vs = _states(L, 7)
    cache = MiniCache(L, [PairSpec(2, gamma=0.3)], window=1)
    assert cache.compression_ratio == 1.0
    assert [s["compression"] for s in cache.stats()] == [1.0] * L
    _feed(cache, ks, vs, [5, 1, 1])
    assert cache.compression_ratio > 1.0
    assert not cache.crop_is_exact(2)
    cache.crop(0)
    assert cache.seq_len(2) == 0 and cache.nbytes > 0 and cache.dense_nbytes == 0
    assert cache.compression_ratio == 1.0
    assert [s["compression"] for s in cache.stats()] == [1.0] * L
    assert not cache.crop_is_exact(2)     # (the emptied store keeps its extremes)
    assert cache.crop_is_exact(0) and MiniCache(L, [PairSpec(2)]).crop_is_exact(2)


def test_settings_are_checked_where_they_are_given():
    """A PairSpec is checked when it is built; the shared defaults of a plan or a cache even
    when no pair takes them; JSON that does not parse is named as `text`."""
    for make, exc, match in (
            (lambda: PairSpec(prev="x"), TypeError, "prev: expected a layer index"),
            (lambda: PairSpec(1, t=9), ValueError, "t: expected a value in \\[0, 1\\], got 9"),
            (lambda: PairSpec(1, magnitude="l2"), ValueError, "magnitude: expected one of"),
            (lambda: PairSpec(1, method="max"), ValueError, "method: expected one of"),
            (lambda: PairSpec(1).check(num_layers="3"), TypeError, "num_layers: expected"),
            (lambda: MergePlan([], t=2), ValueError, "t: expected a value in"),
            (lambda: MergePlan([(0, 1)], gamma=-1), ValueError, "gamma: expected a value in"),
            (lambda: MiniCache(4, plan=MergePlan([]), t=5), ValueError, "t: expected a value"),
            (lambda: MiniCache(4, plan=[], sink=-1), ValueError, "sink: expected an int >= 0"),
            (lambda: MergePlan.from_json("{"), ValueError, "text: not valid JSON"),
            (lambda: MergePlan.from_json(None), TypeError, "text: expected a JSON string")):
        with pytest.raises(exc, match=match):
            make()
    assert PairSpec(1).check(num_layers=3) == PairSpec(1)


def test_select_batch_takes_row_numbers_only():
    """A uint8 or bool index (a mask to torch) or a float one is refused, not reinterpreted;
    the cache is left as it was."""
    cache = MiniCache(3, [(0, 1)])
    for layer in range(3):
        cache.update(layer, torch.randn(2, 2, 5, D), torch.randn(2, 2, 5, D))
    before = _snapshot(cache)
    for index, exc, match in (
            (torch.tensor([1, 0], dtype=torch.uint8), TypeError, "index: expected an integer"),
            (torch.tensor([True, False]), TypeError, "dtype torch.bool"),
            (torch.tensor([1.0, 0.0]), TypeError, "dtype torch.float32"),
            (torch.tensor([1, 0], device="meta"), ValueError, "index: a tensor on the meta")):
        with pytest.raises(exc, match=match):
            cache.select_batch(index)
        _same(before, _snapshot(cache))
    for dtype in (torch.int8, torch.int32):
        cache.select_batch(torch.tensor([1, 0], dtype=dtype))   # any signed integer rows


def test_meta_states_are_refused_before_anything_is_stored():
    cache = MiniCache(3, [(0, 1)])
    k = torch.randn(1, 2, 5, D, device="meta")
    with pytest.raises(ValueError, match="k: a tensor on the meta device"):
        cache.update(0, k, k)
    assert cache.seq_len(0) == 0
    cache.update(0, torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D))   # not stuck mid-prefill


def test_mean_pairs_take_any_states():
    """A "mean" pair averages: no head-dim or dtype limit of merge applies to it."""
    for D, dtype in ((8, torch.float32), (512, torch.float32), (16, torch.float64)):
        cache = MiniCache(2, [PairSpec(0, method="mean")], window=4)
        k = torch.randn(1, 2, 7, D, dtype=dtype)
        cache.update(0, k, k)
        cache.update(1, k, k)
        assert cache.get(1)[0].shape == (1, 2, 7, D)


# ---- padding ----------------------------------------------------------------------------------
def _padded_states(L, S, pad, seed=0):
    """States of L layers, with row 1's first `pad` positions nearly antiparallel between
    adjacent layers (d near 1: without a mask they would set the rows' d_max)."""
    ks, vs = _states(L, S, seed=seed)
    for xs in (ks, vs):
        for layer in range(1, L):
            xs[layer][1, :, :pad] = -xs[layer - 1][1, :, :pad] + 0.01 * xs[layer][1, :, :pad]
    return ks, vs


def _padded_and_alone(L, ks, vs, pad, prompt, steps, sink=0, then=None):
    """Two caches of `PairSpec(1, gamma=0.3, sink=sink)`, W = 1, fed a prompt and `steps`
    decode steps: "padded", the batch with row 1's first `pad` positions marked as padding,
    and "alone", row 1 without them. `then(cache, K, V, start)`, if given, runs on each after
    the feed (K, V: the states it was fed; start: the first position of ks it holds)."""
    mask = torch.ones(B, prompt, dtype=torch.int64)
    mask[1, :pad] = 0
    caches = {}
    for name, rows, start in (("padded", slice(None), 0), ("alone", slice(1, 2), pad)):
        cache = MiniCache(L, [PairSpec(1, gamma=0.3, sink=sink)], window=1)
        if name == "padded":
            cache.set_attention_mask(mask)
        K, V = [k[rows, :, start:] for k in ks], [v[rows, :, start:] for v in vs]
        _feed(cache, K, V, [prompt - start] + [1] * steps)
        if then is not None:
            then(cache, K, V, start)
        caches[name] = cache
    return caches["padded"], caches["alone"]


def test_padded_row_keeps_what_it_keeps_unpadded():
    """With W = 1 and no sink, a left-padded row's store holds, at its tokens, exactly what the
    same row alone (unpadded) holds: the padding changes no retention decision."""
    L, pad, prompt, steps = 4, 5, 9, 6
    ks, vs = _padded_states(L, prompt + steps, pad, seed=3)
    padded_cache, alone_cache = _padded_and_alone(L, ks, vs, pad, prompt, steps)
    alone_pairs = alone_cache.merged_pairs(1)
    for padded, alone in zip(padded_cache.merged_pairs(1), alone_pairs):
        assert not padded.retained[1, :, :pad].any()
        for f in ("e", "mag_prev", "mag_cur", "retained"):
            assert torch.equal(getattr(padded, f)[1:, :, pad:], getattr(alone, f)), f
        assert torch.equal(padded.d_min[1:], alone.d_min)
        assert torch.equal(padded.d_max[1:], alone.d_max)
    # Without the mask the padding sets row 1's extremes.
    cache = MiniCache(L, [PairSpec(1, gamma=0.3)], window=1)
    _feed(cache, ks, vs, [prompt] + [1] * steps)
    assert not torch.equal(cache.merged_pairs(1)[0].d_max[1:], alone_pairs[0].d_max)


@pytest.mark.parametrize("sink,pad", [(3, 5), (3, 2), (6, 5), (4, 4)])
def test_padded_row_with_a_sink_holds_what_it_holds_unpadded(sink, pad):
    """With W = 1 and a sink, a left-padded row keeps its own first `sink` tokens as they are
    (those past the sink positions are retained, outside the extremes), so at its tokens it
    holds exactly what the same row alone (unpadded) holds: the restored states bit for bit,
    and the same extremes."""
    L, prompt, steps = 4, 9, 6
    ks, vs = _padded_states(L, prompt + steps, pad, seed=13)
    padded, alone = _padded_and_alone(L, ks, vs, pad, prompt, steps, sink=sink)
    for layer in (1, 2):
        for got, want in zip(padded.get(layer), alone.get(layer)):
            assert torch.equal(got[1:, :, pad:], want), layer
    kept = 0
    for p, a in zip(padded.merged_pairs(1), alone.merged_pairs(1)):
        assert torch.equal(p.d_min[1:], a.d_min) and torch.equal(p.d_max[1:], a.d_max)
        # the row's first tokens past the sink positions: retained in the padded store
        first = max(0, sink - pad)            # (how many of them the padded sink holds)
        n = min(sink, prompt + steps - 1 - pad) - first
        s0 = max(sink, pad) - sink            # (their place in the store)
        assert p.retained[1, :, s0:s0 + n].all()
        kept += n
    assert kept > 0
    # The batch's other row, unpadded, keeps nothing more than it would alone.
    other = MiniCache(L, [PairSpec(1, gamma=0.3, sink=sink)], window=1)
    _feed(other, [k[:1] for k in ks], [v[:1] for v in vs], [prompt] + [1] * steps)
    for p, o in zip(padded.merged_pairs(1), other.merged_pairs(1)):
        assert torch.equal(p.retained[:1], o.retained)


@pytest.mark.parametrize("cut", [3, 4, 5, 6])
def test_padded_row_with_a_sink_through_a_crop(cut):
    """A crop keeps the store's extremes even when it leaves no merged token: a left-padded row
    with a sink, cropped and decoded further, still holds what the same prompt alone holds
    (cropped to the same tokens), however many of its kept tokens the crop leaves."""
    L, pad, prompt, steps, sink, more = 4, 2, 9, 6, 3, 6
    ks, vs = _padded_states(L, prompt + steps + more, pad, seed=17)

    def crop_and_go_on(cache, K, V, start):
        before = cache.merged_pairs(1)[0].d_max.clone()
        cache.crop(cut - start)
        m = cache.merged_pairs(1)[0]
        assert torch.equal(m.d_max, before) and m.shape[2] == max(0, cut - start - sink)
        for pos in range(cut - start, cut - start + more):
            for layer in range(L):
                cache.update(layer, K[layer][:, :, pos:pos + 1], V[layer][:, :, pos:pos + 1])

    padded, alone = _padded_and_alone(L, ks, vs, pad, prompt, steps, sink=sink,
                                      then=crop_and_go_on)
    for layer in (1, 2):
        for got, want in zip(padded.get(layer), alone.get(layer)):
            assert torch.equal(got[1:, :, pad:], want), layer
    for p, a in zip(padded.merged_pairs(1), alone.merged_pairs(1)):
        assert torch.equal(p.d_min[1:], a.d_min) and torch.equal(p.d_max[1:], a.d_max)


@pytest.mark.parametrize("window,sink", [(3, 2), (4, 0), (1, 6)])
def test_mask_follows_positions_through_sinks_and_chunks(window, sink):
    """The mask's positions line up with the tokens through the sink, the prompt chunk and the
    decoded W-chunks (a pad at a decoded position included); positions past it are tokens."""
    L, prompt, steps = 3, 8, 11
    ks, vs = _padded_states(L, prompt + steps, 4, seed=window)
    mask = torch.ones(B, prompt + 5, dtype=torch.bool)
    mask[1, :4] = False
    mask[0, prompt + 2] = False      # a decoded position
    mask[0, prompt + 4] = False      # the mask's last: a W-chunk with padding runs past it
    cache = MiniCache(L, [PairSpec(1, gamma=0.25, sink=sink)], window=window)
    cache.set_attention_mask(mask)
    assert torch.equal(cache.attention_mask, mask) and cache.attention_mask is not mask
    total = _feed(cache, ks, vs, [prompt] + [1] * steps)
    full = torch.ones(B, total, dtype=torch.bool)
    full[:, :mask.shape[1]] = mask
    exp = _expected(cache.plan.pairs[0], ks[1], ks[2], vs[1], vs[2], prompt, window, total,
                    mask=full)
    for side, layer in ((0, 1), (1, 2)):
        k, v = cache.get(layer)
        assert torch.equal(k, exp["k"][side]) and torch.equal(v, exp["v"][side])
    for got, want in zip(cache.merged_pairs(1), (exp["k"][2], exp["v"][2])):
        assert torch.equal(got.retained, want.retained)
        assert torch.equal(got.d_min, want.d_min) and torch.equal(got.d_max, want.d_max)


def test_attention_mask_edits_and_errors():
    L = 3
    ks, vs = _states(L, 6)
    cache = MiniCache(L, [PairSpec(1)], window=2)
    with pytest.raises(TypeError, match="mask: expected a .B, L. bool or integer tensor, got list"):
        cache.set_attention_mask([[1, 1]])
    with pytest.raises(ValueError, match=r"mask: expected a \[B, L\] tensor, got shape \(4,\)"):
        cache.set_attention_mask(torch.ones(4))
    with pytest.raises(TypeError, match="mask: dtype torch.float32 is not supported"):
        cache.set_attention_mask(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask: expected 1 for a token and 0 for padding, got 3 "
                       r"at \(1, 2\)"):
        cache.set_attention_mask(torch.tensor([[1, 1, 1], [0, 1, 3]]))
    with pytest.raises(ValueError, match="mask: a tensor on the meta device"):
        cache.set_attention_mask(torch.ones(2, 3, dtype=torch.bool, device="meta"))
    assert cache.attention_mask is None
    # A mask whose rows are not the batch's: refused at the first layer, nothing stored.
    cache.set_attention_mask(torch.ones(3, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask: the attention mask has 3 rows, layer 0's states "
                       "a batch of 2"):
        cache.update(0, ks[0], vs[0])
    assert cache.seq_len(0) == 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache.set_attention_mask(mask)
    _feed(cache, ks, vs, [6])
    with pytest.raises(ValueError, match=r"mask: expected 2 rows \(the batch held\), got 1"):
        cache.set_attention_mask(mask[:1])
    assert cache.attention_mask.dtype == torch.bool
    cache.select_batch(torch.tensor([1, 0, 0]))
    assert torch.equal(cache.attention_mask, mask[[1, 0, 0]].bool())
    cache.crop(4)
    assert torch.equal(cache.attention_mask, mask[[1, 0, 0], :4].bool())
    cache.reset()
    assert cache.attention_mask is None
    cache.set_attention_mask(mask)
    cache.set_attention_mask(None)
    assert cache.attention_mask is None
    # Set before anything is held, the mask follows batch edits (and bounds their rows).
    cache.set_attention_mask(mask)
    with pytest.raises(ValueError, match="index: batch rows from 0 to 5 are out of range for a "
                       "batch of 2"):
        cache.select_batch(torch.tensor([0, 5]))
    cache.select_batch(torch.tensor([0, 0, 1, 1]))
    assert torch.equal(cache.attention_mask, mask[[0, 0, 1, 1]].bool())
    _feed(cache, [k.repeat_interleave(2, 0) for k in ks], [v.repeat_interleave(2, 0) for v in vs],
          [6])
    assert not cache.merged_pairs(1)[0].retained[:2, :, :2].any()


@pytest.mark.parametrize("pads", [[0, 4], [3, 1], [2, 0], [9, 0]])
def test_padded_decode_parts(pads):
    """decode_attention over `padded_decode_parts` attends to the keys after each row's first
    `pads[b]` positions (in the sink, the store, or both), as attention over `get(layer)`
    does; padding that reaches the tail is not expressible (None), nor is a dense layer."""
    from minitriton.reference import decode_attention_ref

    L, prompt, steps = 3, 9, 5
    ks, vs = _states(L, prompt + steps, seed=41)
    cache = MiniCache(L, [PairSpec(1, gamma=0.3, sink=2)], window=3)
    _feed(cache, ks, vs, [prompt] + [1] * steps)
    pads = torch.tensor(pads)
    q = torch.randn(B, 2 * H, D, generator=torch.Generator().manual_seed(5))
    assert cache.padded_decode_parts(0, pads) is None
    for layer in (1, 2):
        parts = cache.padded_decode_parts(layer, pads)
        sink, merged = 2, cache.merged_pairs(1)[0].shape[2]
        if int(pads.max()) > sink + merged:
            assert parts is None
            continue
        k_pair, v_pair, side, k_extra, v_extra, starts, tail_lens = parts
        o = minitriton.decode_attention(q, k_pair, v_pair, layer=side, k_tail=k_extra,
                                        v_tail=v_extra, seq_starts=starts, tail_lens=tail_lens)
        k, v = cache.get(layer)
        want, _ = decode_attention_ref(q, k, v, seq_starts=pads)
        torch.testing.assert_close(o.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    assert cache.padded_decode_parts(2, torch.tensor([cache.seq_len(2), 0])) is None
    for bad, exc, match in (([0, 1], TypeError, "pads: expected an integer .B. CPU tensor, got "
                                                "list"),
                            (torch.tensor([0.5, 1.0]), TypeError, "got torch.float32"),
                            (torch.tensor([0, 1, 2]), ValueError,
                             r"pads: expected shape \(2,\) \(the batch held\), got \(3,\)"),
                            (torch.tensor([-3, 1]), ValueError, r"pads: expected counts >= 0, "
                                                                r"got \[-3, 1\]"),
                            (torch.zeros(2, dtype=torch.int64, device="meta"), ValueError,
                             "pads: expected a CPU tensor")):
        with pytest.raises(exc, match=match):
            cache.padded_decode_parts(2, bad)
