"""decode_attention against the float64 reference (decode_attention_ref over restore_ref), on the
Triton kernels (interpreter on a CPU) and the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import minitriton
from conftest import DTYPES, assert_close
from helpers import strided_twin
from minitriton.decode import decode_attention
from minitriton.pair import MergedPair, _slots_from_mask
from minitriton.reference import decode_attention_ref, merge_ref, restore_ref

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---- builders --------------------------------------------------------------------------------
def states(B, H, S, D, dtype, device, seed, corr=0.7):
    """Two correlated layers' states [B, H, S, D]."""
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(B, H, S, D, generator=g)
    xc = corr * xp + (1 - corr * corr) ** 0.5 * torch.randn(B, H, S, D, generator=g)
    return xp.to(dtype).to(device), xc.to(dtype).to(device)


def pair_from_reference(xp, xc, t=0.6, gamma=0.3, magnitude="norm") -> MergedPair:
    """A MergedPair holding exactly what merge_ref computes (e rounded to the dtype), so that a
    decode failure cannot come from the merge implementation."""
    B, H, S, D = xp.shape
    dtype, dev = xp.dtype, xp.device
    if S == 0:
        z = torch.zeros(B, H, 0, device=dev)
        return MergedPair(xp.clone(), z, z.clone(), z.to(torch.int32), xp.new_zeros(0, D),
                          xp.new_zeros(0, D), torch.zeros(B, H, device=dev),
                          torch.zeros(B, H, device=dev), t, gamma, magnitude)
    r = merge_ref(xp, xc, t, gamma, magnitude)
    ret = torch.from_numpy(r["retained"]).to(dev)
    f32 = dict(dtype=torch.float32, device=dev)
    return MergedPair(torch.from_numpy(r["e"]).to(dtype=dtype, device=dev),
                      torch.from_numpy(r["mag_prev"]).to(**f32),
                      torch.from_numpy(r["mag_cur"]).to(**f32), _slots_from_mask(ret),
                      xp[ret], xc[ret], torch.from_numpy(r["d_min"]).to(**f32),
                      torch.from_numpy(r["d_max"]).to(**f32), t, gamma, magnitude)


def restored(m: MergedPair, xp, xc, layer):
    """float64 [B, H, S, D]: restore_ref of what the pair stores (its e, mags and retention)."""
    as64 = lambda x: x.detach().cpu().double().numpy()  # noqa: E731
    d = dict(e=as64(m.e), mag_prev=as64(m.mag_prev), mag_cur=as64(m.mag_cur),
             retained=m.retained.cpu().numpy(), x_prev=as64(xp), x_cur=as64(xc))
    return restore_ref(d)[0 if layer == "prev" else 1]


class Case:
    """q, k/v pairs (and their sources), tails: everything one decode call needs."""

    def __init__(self, B, H, G, S, T, D, dtype, device, seed=0, magnitude="norm", gamma=0.3,
                 corr=0.7):
        g = torch.Generator().manual_seed(seed + 1000)
        self.kp, self.kc = states(B, H, S, D, dtype, device, seed, corr)
        self.vp, self.vc = states(B, H, S, D, dtype, device, seed + 1, corr)
        self.k = pair_from_reference(self.kp, self.kc, magnitude=magnitude, gamma=gamma)
        self.v = pair_from_reference(self.vp, self.vc, magnitude=magnitude, gamma=gamma)
        self.q = torch.randn(B, H * G, D, generator=g).to(dtype).to(device)
        self.k_tail = torch.randn(B, H, T, D, generator=g).to(dtype).to(device)
        self.v_tail = torch.randn(B, H, T, D, generator=g).to(dtype).to(device)
        self.dtype = dtype

    def run(self, layer, tail=True, **kw):
        if tail:
            kw.setdefault("k_tail", self.k_tail)
            kw.setdefault("v_tail", self.v_tail)
        return decode_attention(self.q, self.k, self.v, layer=layer, return_lse=True, **kw)

    def check(self, layer, tail=True, **kw):
        o, lse = self.run(layer, tail, **kw)
        kw.pop("num_splits", None)
        kt, vt = (kw.pop("k_tail", self.k_tail), kw.pop("v_tail", self.v_tail)) if tail \
            else (None, None)
        o_ref, lse_ref = decode_attention_ref(
            self.q, restored(self.k, self.kp, self.kc, layer),
            restored(self.v, self.vp, self.vc, layer), kt, vt, **kw)
        check_output(o, lse, o_ref, lse_ref, self.q, self.dtype)
        return o, lse


def check_output(o, lse, o_ref, lse_ref, q, dtype):
    assert o.shape == q.shape and o.dtype == q.dtype and o.device == q.device
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    # o is a convex combination of value rows: compare each row relative to its largest entry.
    scale = np.abs(o_ref).max(axis=-1, keepdims=True)
    assert_close(o.cpu(), o_ref, dtype, scale=scale, what="o")
    lse = lse.cpu().double().numpy()
    empty = np.isneginf(lse_ref)
    assert np.array_equal(np.isneginf(lse), empty), "lse = -inf exactly for the empty rows"
    assert_close(lse[~empty], lse_ref[~empty], torch.float32, scale=1 + np.abs(lse_ref[~empty]),
                 what="lse")


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# ---- against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_matches_reference(backend, device, dtype):
    c = Case(B=3, H=2, G=3, S=37, T=5, D=80, dtype=dtype, device=device)
    assert 0 < c.k.num_retained < c.k.e.shape[0] * 2 * 37  # merged and retained tokens both
    for layer in ("prev", "cur"):
        c.check(layer, seq_lens=i32([37, 1, 20], device), tail_lens=i32([5, 0, 3], device))
    c.check("cur", tail=False)


@pytest.mark.parametrize("G", [1, 2, 4, 7, 18])
def test_group_sizes(backend, device, G):
    """GQA: every query head of a KV head, also beyond one program's 16 rows (G = 18)."""
    c = Case(B=1, H=2, G=G, S=23, T=3, D=64, dtype=torch.float32, device=device, seed=G)
    c.check("cur")


@pytest.mark.parametrize("S,D", [(1, 64), (31, 80), (300, 128), (9, 17), (12, 200), (7, 256)])
def test_lengths_and_head_dims(backend, device, S, D):
    c = Case(B=1, H=1, G=2, S=S, T=2, D=D, dtype=torch.float16, device=device, seed=S)
    c.check("prev")


def test_ragged_edges(backend, device):
    """seq_len 0 with a tail, seq_len 1, tail 0, and a row with nothing at all (o = 0)."""
    c = Case(B=5, H=2, G=2, S=19, T=4, D=32, dtype=torch.float32, device=device)
    o, lse = c.check("cur", seq_lens=i32([0, 1, 19, 0, 7], device),
                     tail_lens=i32([4, 0, 0, 0, 1], device))
    assert torch.equal(o[3], torch.zeros_like(o[3])) and torch.isneginf(lse[3]).all()
    c.check("prev", tail=False, seq_lens=i32([0, 1, 19, 3, 7], device))
    # An empty tail tensor is no tail.
    empty = c.k_tail[:, :, :0]
    c.check("cur", k_tail=empty, v_tail=empty, tail_lens=i32([0] * 5, device))


def test_empty_cache(backend, device):
    """S = 0: only the tail counts; and with no tail either, every row gives o = 0."""
    c = Case(B=2, H=1, G=2, S=0, T=6, D=16, dtype=torch.float32, device=device)
    c.check("prev")
    o, lse = c.check("prev", tail=False)
    assert (o == 0).all() and torch.isneginf(lse).all()


def test_default_dtype_does_not_leak(backend, device):
    """Outputs keep their documented dtypes whatever torch's default dtype is."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for S, T in ((0, 0), (5, 0), (0, 3), (5, 3)):
            x = torch.randn(1, 1, S, 16, dtype=torch.float32, device=device)
            tail = torch.randn(1, 1, T, 16, dtype=torch.float32, device=device)
            m = minitriton.merge(x, x.flip(-1))
            assert {t.dtype for t in (m.mag_prev, m.mag_cur, m.d_min, m.d_max)} == {torch.float32}
            o, lse = decode_attention(torch.randn(1, 2, 16, dtype=torch.float32, device=device),
                                      m, m, layer="cur", k_tail=tail, v_tail=tail,
                                      return_lse=True)
            assert (o.dtype, lse.dtype) == (torch.float32, torch.float32), (S, T)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_projection_magnitudes(backend, device, dtype):
    """magnitude="projection" stores signed coefficients: used as they are."""
    c = Case(B=2, H=2, G=2, S=29, T=3, D=48, dtype=dtype, device=device,
             magnitude="projection", gamma=0.1, corr=-0.95)
    assert (c.k.mag_prev < 0).any() and (c.v.mag_prev < 0).any()
    c.check("prev")
    c.check("cur")


def test_sm_scale(backend, device):
    c = Case(B=1, H=2, G=2, S=17, T=2, D=64, dtype=torch.float32, device=device)
    c.check("cur", sm_scale=0.37)
    c.check("cur", sm_scale=-0.1)
    # A scale near float32's largest number on a tiny q: q * sm_scale is ~30 q, while
    # sm_scale * log2(e) would overflow (the kernel's exponent is base 2).
    c.q = c.q * 1e-37
    c.check("cur", sm_scale=3e38, num_splits=3)


def test_strided_inputs(backend, device):
    """q, tails and the pair's e with non-contiguous strides give the same result."""
    c = Case(B=2, H=2, G=2, S=21, T=4, D=32, dtype=torch.float32, device=device)
    o_ref = c.run("cur")[0]
    q_wide = torch.zeros(2, 4, 2 * 32, device=device)
    q_wide[..., ::2] = c.q
    kt = c.k_tail.transpose(1, 2).contiguous().transpose(1, 2)  # a [B, T, H, D] buffer
    vt = torch.zeros(2, 2, 8, 32, device=device)[:, :, 2:6]
    vt.copy_(c.v_tail)
    e = c.k.e.transpose(1, 2).contiguous().transpose(1, 2)
    k = MergedPair(e, *c.k.tensors()[1:], c.k.t, c.k.gamma, c.k.magnitude)
    assert not (q_wide[..., ::2].is_contiguous() or kt.is_contiguous() or vt.is_contiguous()
                or e.is_contiguous())
    o = decode_attention(q_wide[..., ::2], k, c.v, layer="cur", k_tail=kt, v_tail=vt)
    assert_close(o, o_ref, torch.float32, what="strided vs contiguous")
    # Lengths read through a stride: columns of a [B, 2] int32 table.
    lens = i32([[21, 3], [6, 1]], device)
    o_ref = c.check("cur", seq_lens=lens[:, 0].contiguous(), tail_lens=lens[:, 1].contiguous())[0]
    assert lens[:, 0].stride(0) == 2
    o = c.run("cur", seq_lens=lens[:, 0], tail_lens=lens[:, 1])[0]
    assert torch.equal(o, o_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_strided_pairs(backend, device, dtype):
    """Pairs whose every tensor is a strided view (magnitudes, slots and retained stores each
    with their own strides) attend as their contiguous twins, bit for bit."""
    c = Case(B=2, H=2, G=3, S=19, T=3, D=48, dtype=dtype, device=device, seed=43, gamma=0.4)
    assert c.k.num_retained > 1 and c.v.num_retained > 1
    for layer in ("prev", "cur"):
        o, lse = c.run(layer)
        o2, lse2 = decode_attention(c.q, strided_twin(c.k), strided_twin(c.v), layer=layer,
                                    k_tail=c.k_tail, v_tail=c.v_tail, return_lse=True)
        assert torch.equal(o, o2) and torch.equal(lse, lse2), layer


@pytest.mark.parametrize("num_splits", [1, 2, 7, 23, 40])
def test_num_splits(device, monkeypatch, num_splits):
    """Any number of splits gives the same result, also more splits than blocks, and more
    non-empty splits than the reduce kernel combines in one step (16)."""
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    c = Case(B=2, H=1, G=3, S=330, T=6, D=64, dtype=torch.bfloat16, device=device)
    # A dominant key in the last split: the reduce must rescale what it combined before.
    c.k_tail[0, 0, 0] = 2 * c.q[0, 0]
    c.check("prev", num_splits=num_splits, seq_lens=i32([330, 2], device),
            tail_lens=i32([6, 1], device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_torch_upcast_chunks(monkeypatch, dtype, tokens):
    """On a CPU the torch path upcasts a half-precision e chunk by chunk along S: any chunk
    length (a short last chunk included) matches the reference, with retained tokens and
    ragged lengths."""
    from minitriton import _upcast

    monkeypatch.setenv("MINITRITON_BACKEND", "torch")
    c = Case(B=2, H=2, G=3, S=45, T=4, D=48, dtype=dtype, device="cpu", seed=tokens)
    assert c.k.num_retained > 0 and c.v.num_retained > 0
    seq_lens, tail_lens = i32([45, 30], "cpu"), i32([4, 1], "cpu")
    monkeypatch.setattr(_upcast, "UPCAST_BYTES", 1)      # the floor: MIN_TOKENS a chunk
    assert len(list(_upcast.upcast_chunks(c.k.e))) == -(-45 // _upcast.MIN_TOKENS)
    monkeypatch.setattr(_upcast, "MIN_TOKENS", 1)
    monkeypatch.setattr(_upcast, "UPCAST_BYTES", 4 * 2 * 2 * 48 * tokens)
    assert len(list(_upcast.upcast_chunks(c.k.e))) == -(-45 // tokens)
    for layer in ("prev", "cur"):
        c.check(layer, seq_lens=seq_lens, tail_lens=tail_lens)


@given(B=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(0, 40), p=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_retained_index_two_ways(B, H, S, p, seed):
    """The torch path's two ways to find each retained-store row's (bh, s): the scatter that
    CUDA tensors use (no host synchronisation) and `nonzero` on a CPU agree."""
    from minitriton.torch_decode import _retained_index

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, S, generator=g) < p
    slot = _slots_from_mask(mask)
    n = int(mask.sum())
    bh, s = _retained_index(slot, n, sync_free=False)
    bh2, s2 = _retained_index(slot, n, sync_free=True)
    assert torch.equal(bh, bh2) and torch.equal(s, s2) and bh.shape == (n,)
    assert mask.reshape(B * H, S)[bh, s].all()


def test_poisoned_buffers_are_fully_written(device, monkeypatch):
    """Given NaN-filled outputs and partials, the kernels write every element they own."""
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    from minitriton.kernels.decode import decode_attention_triton
    c = Case(B=3, H=2, G=3, S=20, T=5, D=40, dtype=torch.float16, device=device)
    B, Hq, D = c.q.shape
    splits = 6  # more splits than the 2 blocks of a row: most partials are empty
    out = torch.full((B, Hq, D), float("nan"), dtype=c.q.dtype, device=device)
    lse = torch.full((B, Hq), float("nan"), device=device)
    ws = torch.full((B, Hq, splits, D + 2), float("nan"), device=device)
    seq_lens, tail_lens = i32([20, 0, 3], device), i32([5, 0, 2], device)
    decode_attention_triton(c.q, c.k, c.v, "cur", c.k_tail, c.v_tail, seq_lens, tail_lens,
                            D ** -0.5, splits, out=out, lse=lse, workspace=ws)
    assert not torch.isnan(ws).any() and not torch.isnan(out).any()
    assert not torch.isnan(lse).any() and torch.isneginf(lse[1]).all()
    o_ref, lse_ref = decode_attention_ref(
        c.q, restored(c.k, c.kp, c.kc, "cur"), restored(c.v, c.vp, c.vc, "cur"),
        c.k_tail, c.v_tail, seq_lens, tail_lens)
    check_output(out, lse, o_ref, lse_ref, c.q, c.dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_clamps_out_of_range_lengths(device, monkeypatch, num_splits):
    """Lengths are checked by `decode_attention` on a CPU only (on CUDA the check would
    synchronise): the kernels clamp seq_lens and seq_starts to [0, S] and tail_lens to [0, T],
    so a length out of range reads nothing outside the cache; the output is that of the
    clamped lengths, bit for bit."""
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    from minitriton.kernels.decode import decode_attention_triton
    c = Case(B=3, H=2, G=2, S=13, T=4, D=32, dtype=torch.float32, device=device, seed=41)

    def run(seq_lens, tail_lens, starts):
        return decode_attention_triton(c.q, c.k, c.v, "cur", c.k_tail, c.v_tail,
                                       i32(seq_lens, device), i32(tail_lens, device), 32 ** -0.5,
                                       num_splits, seq_starts=i32(starts, device))

    o, lse = run([13 + 40, 9, 13], [4 + 30, 2, -5], [-7, 3, 13 + 9])
    o_ok, lse_ok = run([13, 9, 13], [4, 2, 0], [0, 3, 13])
    assert torch.isfinite(o).all() and torch.equal(o, o_ok) and torch.equal(lse, lse_ok)
    o, lse = run([-4, 9, 13], [4, 2, 1], [0, 3, 5])
    o_ok, lse_ok = run([0, 9, 13], [4, 2, 1], [0, 3, 5])
    assert torch.equal(o, o_ok) and torch.equal(lse, lse_ok)


def test_with_merge_and_restore(backend, device):
    """End to end: minitriton.merge, then decode equals attention over minitriton.restore."""
    kp, kc = states(2, 2, 33, 64, torch.float32, device, seed=5)
    vp, vc = states(2, 2, 33, 64, torch.float32, device, seed=6)
    k, v = minitriton.merge(kp, kc, gamma=0.2), minitriton.merge(vp, vc, gamma=0.2)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(7)).to(device)
    for layer, i in (("prev", 0), ("cur", 1)):
        o = decode_attention(q, k, v, layer=layer)
        o_ref, _ = decode_attention_ref(q, minitriton.restore(k)[i], minitriton.restore(v)[i])
        assert_close(o, o_ref, torch.float32, scale=np.abs(o_ref).max(-1, keepdims=True),
                     what=f"decode vs restore, layer {layer}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # (numpy, over NaN and inf)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_key_stays_in_its_head(backend, device, bad):
    """A key with a NaN (or an inf that makes its score +inf) in layer cur, a pair merge keeps
    as it is: decode over layer cur gives o = lse = NaN for its KV head's queries, as attention
    over the dense layer does, and the other heads' output equals that of the same cache
    without it; decode over layer prev, whose key is finite, matches attention over the
    restored layer."""
    G = 2
    kp, kc = states(2, 2, 9, 16, torch.float32, device, seed=3)
    vp, vc = states(2, 2, 9, 16, torch.float32, device, seed=4)
    q = torch.randn(2, 2 * G, 16, generator=torch.Generator().manual_seed(5)).to(device)
    q[..., 2] = q[..., 2].abs()                          # an inf key component scores +inf
    kc_bad = kc.clone()
    kc_bad[0, 1, 4, 2] = bad
    k, k_bad, v = (minitriton.merge(a, b, 0.6, 0.3) for a, b in ((kp, kc), (kp, kc_bad),
                                                                  (vp, vc)))
    o = decode_attention(q, k, v, layer="cur")
    o_bad, lse_bad = decode_attention(q, k_bad, v, layer="cur", return_lse=True)
    head = torch.zeros(2, 2 * G, dtype=torch.bool, device=device)
    head[0, G:] = True                                   # the query heads of KV head 1, b = 0
    assert torch.isnan(o_bad[head]).all() and torch.isnan(lse_bad[head]).all()
    assert_close(o_bad[~head], o[~head], torch.float32, what="the other heads")
    o_prev = decode_attention(q, k_bad, v, layer="prev")
    o_ref, _ = decode_attention_ref(q, minitriton.restore(k_bad, "prev"),
                                    minitriton.restore(v, "prev"))
    assert_close(o_prev, o_ref, torch.float32, scale=np.abs(o_ref).max(-1, keepdims=True),
                 what="layer prev")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # (numpy, over NaN and inf)
def test_non_finite_rows_past_the_lengths(backend, device):
    """Tokens past seq_lens / tail_lens may hold anything, NaN and inf included (padding of a
    preallocated buffer, which merge then retains as it is): they get weight 0 and never reach
    the output, which matches attention over the valid tokens."""
    B, H, G, S, T, D = 2, 2, 2, 9, 4, 16
    kp, kc = states(B, H, S, D, torch.float32, device, seed=3)
    vp, vc = states(B, H, S, D, torch.float32, device, seed=4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H * G, D, generator=g).to(device)
    kt, vt = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(2))
    seq_lens, tail_lens = i32([6, 9], device), i32([2, 4], device)
    kc[0, :, 7, 1] = float("nan")
    vc[0, 1, 6:, 0] = float("inf")
    vc[0, 0, 8, 2] = float("nan")
    kt[0, :, 3] = float("nan")
    vt[0, :, 2:, 5] = -float("inf")
    k, v = minitriton.merge(kp, kc, 0.6, 0.3), minitriton.merge(vp, vc, 0.6, 0.3)
    assert k.retained[0, :, 7].all() and v.retained[0, 1, 6:].all()
    for layer in ("prev", "cur"):
        o, lse = decode_attention(q, k, v, layer=layer, k_tail=kt, v_tail=vt, seq_lens=seq_lens,
                                  tail_lens=tail_lens, return_lse=True)
        assert torch.isfinite(o).all() and torch.isfinite(lse).all(), layer
        o_ref, lse_ref = decode_attention_ref(q, minitriton.restore(k, layer),
                                              minitriton.restore(v, layer), kt, vt, seq_lens,
                                              tail_lens)
        check_output(o, lse, o_ref, lse_ref, q, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_unused_rows_may_hold_anything(backend, device, dtype):
    """What a pair holds where decode never looks (e and magnitudes past seq_lens, as in a
    preallocated pair filled up to the lengths; e at retained tokens, which use their
    originals) does not reach the output: NaN there gives the same result as clean rows."""
    import dataclasses

    c = Case(B=2, H=2, G=2, S=21, T=0, D=32, dtype=dtype, device=device, gamma=0.4)
    seq_lens = i32([13, 21], device)
    assert c.k.retained.any() and c.v.retained.any()
    want = c.run("cur", tail=False, seq_lens=seq_lens)
    past = torch.arange(21, device=device) >= seq_lens.view(2, 1, 1)
    bad = {}
    for name, m in (("k", c.k), ("v", c.v)):
        e = m.e.clone()
        e[past | m.retained] = float("nan")
        bad[name] = dataclasses.replace(m, e=e, mag_cur=m.mag_cur.masked_fill(past, float("inf")),
                                        mag_prev=m.mag_prev.masked_fill(past, float("nan")))
    for layer in ("prev", "cur"):
        o, lse = decode_attention(c.q, bad["k"], bad["v"], layer=layer, seq_lens=seq_lens,
                                  return_lse=True)
        o_ref, lse_ref = decode_attention(c.q, c.k, c.v, layer=layer, seq_lens=seq_lens,
                                          return_lse=True)
        assert torch.isfinite(o).all(), layer
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref), layer
    assert torch.equal(want[0], decode_attention(c.q, bad["k"], bad["v"], layer="cur",
                                                 seq_lens=seq_lens))


@example(B=3, H=2, G=4, S=40, T=5, D=17, dtype=torch.bfloat16, layer="cur", ragged=True,
         num_splits=3, seed=9)
@example(B=2, H=2, G=3, S=40, T=5, D=80, dtype=torch.bfloat16, layer="prev", ragged=True,
         num_splits=3, seed=5)
@example(B=1, H=1, G=7, S=13, T=1, D=256, dtype=torch.float16, layer="cur", ragged=False,
         num_splits=None, seed=6)
@given(B=st.integers(1, 3), H=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3, 4, 7]),
       S=st.sampled_from([0, 1, 2, 13, 40]), T=st.sampled_from([0, 1, 5]),
       D=st.sampled_from([16, 17, 48, 80, 256]), dtype=st.sampled_from(DTYPES),
       layer=st.sampled_from(["prev", "cur"]), ragged=st.booleans(),
       num_splits=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_matches_reference_drawn(backend, device, B, H, G, S, T, D, dtype, layer, ragged,
                                 num_splits, seed):
    c = Case(B, H, G, S, T, D, dtype, device, seed=seed)
    kw = dict(num_splits=num_splits)
    if ragged:
        g = torch.Generator().manual_seed(seed)
        kw["seq_lens"] = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32).to(device)
        if T:
            kw["tail_lens"] = torch.randint(0, T + 1, (B,), generator=g,
                                            dtype=torch.int32).to(device)
    c.check(layer, tail=T > 0, **kw)


# ---- row starts (left padding) ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_seq_starts(backend, device, dtype, num_splits):
    """Merged tokens before seq_starts[b] are skipped: starts inside a split, on a split's
    edge, at the row's length (no merged token) and past it; with and without a tail."""
    c = Case(4, 2, 3, 37, 5, 48, dtype, device, seed=31)
    starts, lens = i32([0, 12, 30, 20], device), i32([37, 30, 30, 9], device)
    for layer in ("prev", "cur"):
        c.check(layer, num_splits=num_splits, seq_starts=starts, seq_lens=lens,
                tail_lens=i32([5, 0, 2, 3], device))
        c.check(layer, tail=False, num_splits=num_splits, seq_starts=i32([3, 16, 0, 36], device))


@example(B=3, G=4, S=40, T=3, D=80, dtype=torch.bfloat16, num_splits=3, seed=2)
@given(B=st.integers(1, 3), G=st.sampled_from([1, 4]), S=st.sampled_from([1, 2, 13, 40]),
       T=st.sampled_from([0, 3]), D=st.sampled_from([16, 80]), dtype=st.sampled_from(DTYPES),
       num_splits=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_seq_starts_drawn(backend, device, B, G, S, T, D, dtype, num_splits, seed):
    c = Case(B, 2, G, S, T, D, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    lens = torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)
    c.check("cur", tail=T > 0, num_splits=num_splits, seq_starts=starts.to(device),
            seq_lens=lens.to(device))


def test_tokens_before_the_start_may_hold_anything(backend, device):
    """A left-padded row's padding never reaches the output, whatever its e, magnitudes or
    retained rows hold (NaN and inf included)."""
    c = Case(2, 2, 2, 21, 3, 32, torch.float32, device, seed=33, gamma=0.5)
    starts = i32([7, 0], device)
    want = c.run("cur", seq_starts=starts)
    before = (torch.arange(21, device=device) < starts.view(2, 1, 1)).expand(2, 2, 21)
    bad = {}
    for name in ("k", "v"):
        m = getattr(c, name)
        e = m.e.clone()
        e[before] = float("nan")
        kept = m.kept_cur.clone()
        kept[m.slot[before & m.retained].long()] = float("inf")
        mag = m.mag_cur.masked_fill(before, float("nan"))
        bad[name] = MergedPair(e, m.mag_prev, mag, m.slot, m.kept_prev, kept, m.d_min, m.d_max,
                               m.t, m.gamma, m.magnitude)
    assert (c.k.retained & before).any()
    got = decode_attention(c.q, bad["k"], bad["v"], layer="cur", k_tail=c.k_tail,
                           v_tail=c.v_tail, seq_starts=starts, return_lse=True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- split heuristic -------------------------------------------------------------------------
def test_wide_d_offsets(device, monkeypatch):
    """The split kernel reads e and the retained rows with int32 offsets along D unless one
    of them has a D stride that would overflow those (WIDE_D, int64 offsets; shapes only
    here: such views need more than 2^31 elements). The WIDE_D build gives the same result."""
    from minitriton.kernels import decode as kd

    D = 128
    fits = torch.empty_strided((2, 3, 5, D), (0, 0, D, (2 ** 31 - 1) // (D - 1)), device="meta")
    wide = torch.empty_strided((2, 3, 5, D), (0, 0, D, 2 ** 31 // (D - 1) + 1), device="meta")
    kept = torch.empty_strided((7, D), (1, 2 ** 24 + 2 ** 20), device="meta")
    small = torch.empty((7, D), device="meta")
    assert not kd.wide_d(fits, small) and kd.wide_d(fits, wide) and kd.wide_d(small, kept)

    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    c = Case(B=2, H=2, G=3, S=19, T=4, D=48, dtype=torch.bfloat16, device=device, gamma=0.4)
    seq_lens = i32([19, 11], device)
    want = c.check("prev", seq_lens=seq_lens, num_splits=2)
    monkeypatch.setattr(kd, "wide_d", lambda *xs: True)
    got = c.check("prev", seq_lens=seq_lens, num_splits=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_split_heuristic():
    from minitriton.kernels.decode import MAX_SPLITS, choose_num_splits
    # Batch 1 at long context spreads over the GPU; a large batch is not split.
    assert choose_num_splits(8, 32768, 32, 132) >= 32
    assert choose_num_splits(64 * 8, 32768, 32, 132) == 1
    assert choose_num_splits(8, 1, 32, 132) == 1 and choose_num_splits(8, 0, 32, 132) == 1
    for programs in (1, 3, 8, 100, 1000):
        for length in (1, 100, 4096, 10 ** 6):
            n = choose_num_splits(programs, length, 32, 132)
            assert 1 <= n <= MAX_SPLITS and n <= max(1, -(-length // 256))


# ---- CUDA graphs -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    c = Case(B=2, H=2, G=4, S=300, T=16, D=128, dtype=torch.bfloat16, device="cuda")
    seq_lens, tail_lens = i32([300, 120], "cuda"), i32([16, 3], "cuda")
    kw = dict(k_tail=c.k_tail, v_tail=c.v_tail, seq_lens=seq_lens, tail_lens=tail_lens)
    decode_attention(c.q, c.k, c.v, layer="cur", **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = decode_attention(c.q, c.k, c.v, layer="cur", **kw)
    for lens in ([300, 120], [17, 0], [0, 299]):
        seq_lens.copy_(i32(lens, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(o, decode_attention(c.q, c.k, c.v, layer="cur", **kw))
