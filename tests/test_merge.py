"""merge / restore against the numpy reference, and the properties of SPEC.md, on the Triton
kernels (interpreter on a CPU) and the torch path."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given
from hypothesis import strategies as st

import minitriton
from conftest import DTYPES, TOL, UNIT, assert_close
from helpers import (borderline_tokens, check_merge_against_reference, d_tolerance, make_pair,
                     same_bits, strided_twin, token_norms)
from minitriton.kernels.merge import _row_scale
from minitriton.reference import decode_attention_ref, merge_ref

DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TOL_E = {dt: TOL[dt]["atol"] for dt in DTYPES}


# ---- against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "sliced"])
def test_matches_reference(backend, device, dtype, magnitude, layout):
    xp, xc = make_pair(2, 3, 37, 80, dtype, device, layout=layout, outliers=3)
    m = minitriton.merge(xp, xc, t=0.6, gamma=0.1, magnitude=magnitude)
    assert m.magnitude == magnitude and m.shape == (2, 3, 37, 80) and m.dtype == dtype
    assert m.num_retained > 0
    check_merge_against_reference(m, xp, xc, 0.6, 0.1, magnitude, assert_close)


@pytest.mark.parametrize("D", [17, 129, 200, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_odd_and_wide_head_dims(backend, device, D, dtype):
    """Every head dim from 16 to 256 works: odd ones, and those past 128 (BLOCK_D = 256)."""
    xp, xc = make_pair(1, 2, 9, D, dtype, device, seed=D, outliers=1, layout="bshd")
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, t=0.4, gamma=0.2, magnitude=magnitude)
        check_merge_against_reference(m, xp, xc, 0.4, 0.2, magnitude, assert_close)


@example(B=2, H=3, S=31, D=80, dtype=torch.float16, t=1.0, gamma=0.3, magnitude="projection",
         layout="sliced", corr=0.5, seed=7)
@example(B=1, H=2, S=7, D=200, dtype=torch.bfloat16, t=0.0, gamma=1.0, magnitude="norm",
         layout="bshd", corr=0.95, seed=8)
@example(B=1, H=1, S=2, D=256, dtype=torch.bfloat16, t=0.5, gamma=0.5, magnitude="projection",
         layout="sliced", corr=0.5, seed=1)
@example(B=2, H=3, S=13, D=17, dtype=torch.float16, t=1.0, gamma=1.0, magnitude="norm",
         layout="bshd", corr=-0.7, seed=2)
@given(B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]), S=st.sampled_from([1, 2, 7, 31]),
       D=st.sampled_from([16, 17, 80, 96, 128, 200, 256]), dtype=st.sampled_from(DTYPES),
       t=st.sampled_from([0.0, 0.25, 0.6, 1.0]) | st.floats(0, 1),
       gamma=st.sampled_from([0.0, 0.05, 1.0]) | st.floats(0, 1),
       magnitude=st.sampled_from(["norm", "projection"]),
       layout=st.sampled_from(["bhsd", "bshd", "sliced"]),
       corr=st.sampled_from([0.0, 0.5, 0.95, -0.7]), seed=st.integers(0, 2**16))
def test_matches_reference_drawn(backend, device, B, H, S, D, dtype, t, gamma, magnitude,
                                 layout, corr, seed):
    xp, xc = make_pair(B, H, S, D, dtype, device, seed=seed, corr=corr, layout=layout)
    m = minitriton.merge(xp, xc, t=t, gamma=gamma, magnitude=magnitude)
    check_merge_against_reference(m, xp, xc, t, gamma, magnitude, assert_close)


@example(dtype=torch.float32, log_p=36.0, log_c=-36.0, D=48, t=0.3, magnitude="norm", seed=5)
@example(dtype=torch.float32, log_p=-36.0, log_c=36.0, D=96, t=0.6, magnitude="projection",
         seed=3)
@example(dtype=torch.float32, log_p=-21.0, log_c=-21.0, D=16, t=0.0, magnitude="norm", seed=4)
@given(dtype=st.sampled_from(DTYPES), log_p=st.floats(-36, 36), log_c=st.floats(-36, 36),
       D=st.sampled_from([16, 48, 96]), t=st.sampled_from([0.0, 0.6, 1.0]) | st.floats(0, 1),
       magnitude=st.sampled_from(["norm", "projection"]), seed=st.integers(0, 2**16))
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # (numpy)
def test_matches_reference_at_any_scale(backend, device, dtype, log_p, log_c, D, t, magnitude,
                                        seed):
    """Each layer at its own scale, 1e-36 to 1e36 (float16: 1e-3 to 1e3; bfloat16 to 1e-30,
    above the subnormals that Triton's interpreter converts wrongly): the reference's e,
    magnitudes, retention and restore, since rows are scaled before squaring wherever their
    squares would overflow or underflow float32."""
    lo, hi = {torch.float16: (-3, 3), torch.bfloat16: (-30, 36)}.get(dtype, (-36, 36))
    log_p, log_c = (min(max(v, lo), hi) for v in (log_p, log_c))
    xp, xc = make_pair(1, 2, 7, D, torch.float32, device, seed=seed, corr=0.8, outliers=1)
    xp, xc = (xp * 10.0 ** log_p).to(dtype), (xc * 10.0 ** log_c).to(dtype)
    m = minitriton.merge(xp, xc, t, 0.2, magnitude)
    check_merge_against_reference(m, xp, xc, t, 0.2, magnitude, assert_close)


# ---- properties (SPEC.md) --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_magnitudes_survive_and_retained_exact(backend, device, dtype):
    xp, xc = make_pair(2, 2, 29, 96, dtype, device, outliers=2, scale=3.0)
    m = minitriton.merge(xp, xc, 0.6, 0.2)
    xp_hat, xc_hat = minitriton.restore(m)
    for x, x_hat, name in ((xp, xp_hat, "prev"), (xc, xc_hat, "cur")):
        n = torch.linalg.vector_norm(x.double(), dim=-1)
        # |x_hat| = |x| up to two roundings to the dtype (e, then mag * e) and float32 noise
        err = (torch.linalg.vector_norm(x_hat.double(), dim=-1) - n).abs()
        bound = (2 * UNIT[dtype] + 1e-6) * n
        assert (err <= bound).all(), f"|x_hat| {name}: max relative error " \
            f"{float((err / n).max()):.3g} > {2 * UNIT[dtype] + 1e-6:.3g}"
        assert torch.equal(x_hat[m.retained], x[m.retained])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("t", [0.0, 1.0])
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_t_endpoints_restore_one_layer(backend, device, dtype, t, magnitude):
    """t = 0 gives prev's direction exactly, t = 1 cur's: each component of e within one
    rounding to the dtype (2 ulp of its own size) of the exact direction, and so the restored
    layer within a few ulp of each input component (the dtype's tolerance table would let
    t = 0.04 through in bfloat16); with "projection" too, whose coefficient x . e is then
    that layer's norm."""
    xp, xc = make_pair(1, 2, 17, 64, dtype, device, seed=3)
    m = minitriton.merge(xp, xc, t=t, gamma=0.0, magnitude=magnitude)
    xp_hat, xc_hat = minitriton.restore(m)
    src = xp if t == 0.0 else xc
    n = torch.linalg.vector_norm(src.double(), dim=-1, keepdim=True)
    u = src.double() / n
    unit = UNIT[dtype]
    assert ((m.e.double() - u).abs() <= 2 * unit * u.abs() + 1e-6).all(), "e at t endpoint"
    hat = xp_hat if t == 0.0 else xc_hat
    err = (hat.double() - src.double()).abs()
    assert (err <= 4 * unit * src.double().abs() + 2e-6 * n).all(), "restored layer"


def _random_rotation(D, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _rope(x, base=10000.0):
    """Rotate-half RoPE at each token's position (a rotation per position, the same for both
    layers of a pair)."""
    S, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("rotation", ["orthogonal", "rope"])
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_shared_rotation_commutes(backend, device, rotation, dtype, magnitude):
    """merge(R x_p, R x_c) restores to R x_hat: the same tokens retained (up to ties at the
    threshold), and the same restored states. Rotated inputs are rounded to the dtype, so the
    comparison is at the dtype's tolerance."""
    xp, xc = make_pair(1, 2, 23, 64, dtype, device, seed=5, outliers=2)
    if rotation == "orthogonal":
        R = _random_rotation(64, 1).to(device)
        rot = lambda x: (x.double() @ R.T).to(dtype)  # noqa: E731
    else:
        rot = lambda x: _rope(x.double()).to(dtype)  # noqa: E731
    xp_r, xc_r = rot(xp), rot(xc)
    m = minitriton.merge(xp, xc, 0.6, 0.1, magnitude=magnitude)
    m_rot = minitriton.merge(xp_r, xc_r, 0.6, 0.1, magnitude=magnitude)
    assert_close(m_rot.e, rot(m.e), dtype, what="e of rotated inputs")
    # (each against its own reference: the rotated inputs are rounded to the dtype again)
    refs = [merge_ref(a, b, 0.6, 0.1) for a, b in ((xp, xc), (xp_r, xc_r))]
    for got, r in zip((m, m_rot), refs):
        assert (np.abs(got.d_max.double().cpu().numpy() - r["d_max"])
                <= d_tolerance(r["d_max"])).all(), "d_max"
    # Retention may differ only where a token is within rounding of either threshold, or where
    # rounding the rotated inputs moved it across (the two references disagree).
    near = refs[0]["retained"] != refs[1]["retained"]
    for r in refs:
        near |= borderline_tokens(r)
    agree = (m.retained == m_rot.retained).cpu().numpy()
    assert (agree | near).all(), f"retention changed under rotation at {np.argwhere(~agree)}"
    r_hat = [rot(x) for x in minitriton.restore(m)]
    hat_r = minitriton.restore(m_rot)
    keep = torch.from_numpy(agree)[..., None].to(device)
    for a, b, x in zip(hat_r, r_hat, (xp, xc)):
        assert_close(torch.where(keep, a, b), b, dtype, scale=token_norms(x),
                     what="restore(merge(Rx)) vs R restore(merge(x))")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_swap_layers_and_t(backend, device, dtype, magnitude):
    xp, xc = make_pair(2, 2, 19, 48, dtype, device, seed=7)
    a = minitriton.merge(xp, xc, t=0.3, gamma=0.1, magnitude=magnitude)
    b = minitriton.merge(xc, xp, t=0.7, gamma=0.1, magnitude=magnitude)
    assert_close(a.e, b.e.float(), dtype, what="e after swapping layers and t -> 1 - t")
    assert_close(a.mag_prev, b.mag_cur, torch.float32, scale=token_norms(xp)[..., 0],
                 what="magnitudes")
    assert_close(a.mag_cur, b.mag_prev, torch.float32, scale=token_norms(xc)[..., 0],
                 what="magnitudes")
    assert torch.equal(a.retained, b.retained)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_swap_antiparallel_at_half(backend, device, dtype):
    """The one exception to the swap symmetry: antiparallel pairs at t = 0.5 have no direction
    in between and take u_c, so swapping the layers gives the other direction, -e; in the same
    rows every other token keeps the symmetry."""
    xp, xc = make_pair(1, 2, 11, 32, dtype, device, seed=5)
    xc[0, 0, 3], xc[0, 1, 7] = -2 * xp[0, 0, 3], -0.5 * xp[0, 1, 7]    # (exact: powers of two)
    a = minitriton.merge(xp, xc, t=0.5, gamma=0.1)
    b = minitriton.merge(xc, xp, t=0.5, gamma=0.1)
    anti = torch.zeros(1, 2, 11, dtype=torch.bool, device=device)
    anti[0, 0, 3] = anti[0, 1, 7] = True
    for m, x in ((a, xc), (b, xp)):           # e = u_c, x_cur's direction
        u = x[anti].double() / torch.linalg.vector_norm(x[anti].double(), dim=-1, keepdim=True)
        assert_close(m.e[anti], u, dtype, what="e of antiparallel pairs at t = 0.5")
    assert torch.equal(a.e[anti], -b.e[anti])
    assert_close(a.e[~anti], b.e[~anti].float(), dtype, what="e of the other tokens")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("which", ["prev", "cur"])
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_positive_scaling_only_scales_magnitude(backend, device, dtype, which, magnitude):
    xp, xc = make_pair(1, 3, 13, 32, dtype, device, seed=11, outliers=1)
    k = 4.0                        # a power of two: exact in every dtype
    sp, sc = (k, 1.0) if which == "prev" else (1.0, k)
    m = minitriton.merge(xp, xc, 0.6, 0.2, magnitude)
    ms = minitriton.merge(xp * sp, xc * sc, 0.6, 0.2, magnitude)
    assert torch.equal(ms.e, m.e)
    assert torch.equal(ms.retained, m.retained)
    assert torch.equal(ms.mag_prev, m.mag_prev * sp)
    assert torch.equal(ms.mag_cur, m.mag_cur * sc)


@example(gammas=[0.0, 5e-324, 0.3, 1 - 2 ** -53, 1.0], seed=3, dtype=torch.bfloat16)
@given(gammas=st.lists(st.floats(0, 1), min_size=2, max_size=4),
       seed=st.integers(0, 1000), dtype=st.sampled_from(DTYPES))
def test_monotone_in_gamma(backend, device, gammas, seed, dtype):
    xp, xc = make_pair(2, 2, 31, 32, dtype, device, seed=seed, corr=0.6)
    prev = None
    for g in sorted(gammas):
        r = minitriton.merge(xp, xc, 0.6, g).retained
        if prev is not None:
            assert not (prev & ~r).any(), f"gamma {g} drops a token retained at a smaller gamma"
        prev = r


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_gamma_endpoints(backend, device, dtype):
    xp, xc = make_pair(2, 3, 41, 32, dtype, device, seed=2, corr=0.3)
    assert minitriton.merge(xp, xc, 0.6, 0.0).num_retained == 0
    m = minitriton.merge(xp, xc, 0.6, 1.0)
    # All but each row's least distant token (random data: one token per row at d_min).
    assert (m.retained.sum(-1) == 40).all()
    # The least gamma above 0 still retains each row's most distant token (its threshold
    # would round to d_max in float32), as the reference does.
    for g in (1e-7, 1e-12, 5e-324):
        r = minitriton.merge(xp, xc, 0.6, g).retained
        assert (r.sum(-1) == 1).all(), g
        assert r.cpu().numpy().tolist() == merge_ref(xp, xc, 0.6, g)["retained"].tolist(), g


def test_reference_gamma_endpoints():
    """The oracle applies the same endpoint rule: gamma = 1 keeps all but the least distant
    token even where d_max - (d_max - d_min) * 1 rounds below d_min in float64 (these angles do),
    and gamma = 0 keeps nothing."""
    xp, xc = _pairs_at_angles([0.3, 1.0, 2.0], 16, "cpu", torch.float64)
    d = merge_ref(xp, xc, 0.5, 1.0)["d"]
    assert d[0, 0, 2] - (d[0, 0, 2] - d[0, 0, 0]) * 1.0 < d[0, 0, 0]    # the rounding in question
    assert merge_ref(xp, xc, 0.5, 1.0)["retained"].tolist() == [[[False, True, True]]]
    assert not merge_ref(xp, xc, 0.5, 0.0)["retained"].any()
    xp, xc = make_pair(2, 3, 41, 32, torch.float32, "cpu", seed=2, corr=0.3)
    assert (merge_ref(xp, xc, 0.6, 1.0)["retained"].sum(-1) == 40).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_batch_invariant(backend, device, dtype):
    """A sequence's result does not depend on the rest of the batch: bit for bit."""
    xp, xc = make_pair(3, 2, 23, 80, dtype, device, seed=4, outliers=2)
    full = minitriton.merge(xp, xc, 0.6, 0.1, "projection")
    full_hat = minitriton.restore(full)
    for b in range(3):
        one = minitriton.merge(xp[b:b + 1], xc[b:b + 1], 0.6, 0.1, "projection")
        for name in ("e", "mag_prev", "mag_cur", "retained", "d_min", "d_max"):
            assert torch.equal(getattr(one, name), getattr(full, name)[b:b + 1]), name
        for a, f in zip(minitriton.restore(one), full_hat):
            assert torch.equal(a, f[b:b + 1])


@example(dtype=torch.float16, seed=0, scale=6e4)
@example(dtype=torch.float16, seed=1, scale=1e30)
@example(dtype=torch.float32, seed=1, scale=1e37)
@example(dtype=torch.float32, seed=3, scale=1e38)
@example(dtype=torch.bfloat16, seed=2, scale=1e30)
@given(dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 6e4, 1e19, 1e30, 1e37, 1e38]))
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # (numpy)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_finite_in_finite_out(backend, device, dtype, seed, scale):
    if dtype == torch.float16 and scale < 1e-6:
        scale = 1e-4                # below float16's subnormals the inputs are just zeros
    xp, xc = make_pair(1, 2, 9, 48, dtype, device, seed=seed, corr=0.5)
    # Components up to the dtype's largest number: |x| can pass float16's (restore saturates)
    # and float32's (such a pair is retained).
    bound = torch.finfo(dtype).max
    xp = (xp.float() * scale).clamp(-bound, bound).to(dtype)
    xc = (xc.float() * scale).clamp(-bound, bound).to(dtype)
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.6, 0.3, magnitude=magnitude)
        for x in (m.e, m.mag_prev, m.mag_cur, *minitriton.restore(m)):
            assert torch.isfinite(x).all(), magnitude


def _beyond_half_range(dtype):
    """(a, b) in `dtype` with sqrt(a^2 + b^2) between the dtype's largest number and float32's
    (a vector with a float32 magnitude that the dtype cannot hold)."""
    big = torch.finfo(dtype).max
    a, b = (torch.tensor([60000.0, 30000.0]) if dtype == torch.float16
            else torch.tensor([3.3e38, 8e37])).to(dtype)
    n = math.hypot(float(a), float(b))
    assert big < n < torch.finfo(torch.float32).max, (dtype, n)
    return a, b


@pytest.mark.parametrize("magnitude", ["norm", "projection"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_half_beyond_range_is_retained(backend, device, dtype, magnitude):
    """A float16 / bfloat16 pair whose magnitude passes the dtype's largest number (finite
    components, |x| above it) is retained whatever gamma: merged, it would restore to a value
    beyond the range. restore gives it back bit for bit, decode_attention equals attention
    over the restored layers, and the other tokens merge as the reference says (the pair
    still counts in its row's extremes)."""
    a, b = _beyond_half_range(dtype)
    xp, xc = make_pair(1, 2, 7, 16, torch.float32, device, seed=4, corr=0.9)
    xp, xc = xp.to(dtype), xc.to(dtype)
    xp[0, 1, 2] = 0
    xp[0, 1, 2, 0], xp[0, 1, 2, 1] = a, b          # x_prev beyond the range
    xc[0, 0, 5] = 0
    xc[0, 0, 5, 3], xc[0, 0, 5, 1] = -b, a         # x_cur beyond the range
    # (partners along the same direction: the projections are the norms too)
    xc[0, 1, 2], xp[0, 0, 5] = xp[0, 1, 2] / 1024, xc[0, 0, 5] / 1024
    for gamma in (0.0, 0.3):
        m = minitriton.merge(xp, xc, 1.0, gamma, magnitude)
        assert m.retained[0, 1, 2] and m.retained[0, 0, 5], gamma
        if gamma == 0.0:
            assert m.num_retained == 2
        check_merge_against_reference(m, xp, xc, 1.0, gamma, magnitude, assert_close)
        k_hat, v_hat = minitriton.restore(m)
        assert same_bits(k_hat[m.retained], xp[m.retained])
        assert same_bits(v_hat[m.retained], xc[m.retained])
        q = torch.zeros(1, 4, 16, device=device, dtype=dtype)   # uniform weights (q . k of
        for layer, x_hat in (("prev", k_hat), ("cur", v_hat)):  # such keys would overflow)
            o = minitriton.decode_attention(q, m, m, layer=layer)
            want = decode_attention_ref(q.double().cpu().numpy(), x_hat.double().cpu().numpy(),
                                        x_hat.double().cpu().numpy())[0]
            assert_close(o, want, dtype, what=f"decode {layer}")
    # Padding beyond the range is merged as usual (never attended): the padded row keeps
    # what it keeps unpadded.
    mask = torch.ones(1, 7, dtype=torch.bool, device=device)
    mask[0, 2] = False
    m = minitriton.merge(xp, xc, 1.0, 0.0, magnitude, mask=mask)
    assert not m.retained[:, :, 2].any() and m.retained[0, 0, 5]
    check_merge_against_reference(m, xp, xc, 1.0, 0.0, magnitude, assert_close,
                                  mask=mask)
    # Inside the range, and at its bound as stored (a float32 magnitude of exactly the largest
    # number, which the float64 norm passes by a hair): merged as any token.
    inside = xp.clone()
    inside[0, 1, 2] = xp[0, 1, 2] / 2
    inside[0, 1, 3] = 0
    inside[0, 1, 3, 0] = torch.finfo(dtype).max
    inside[0, 1, 3, 1] = 1.0 if dtype == torch.float16 else 1e34
    xc_in = xc.clone()
    xc_in[0, 1, 3] = inside[0, 1, 3] / 1024
    assert torch.linalg.vector_norm(inside[0, 1, 3].double()) > torch.finfo(dtype).max
    m = minitriton.merge(inside, xc_in, 1.0, 0.0, magnitude)
    assert not m.retained[0, 1, 2:4].any()
    assert float(m.mag_prev[0, 1, 3]) == pytest.approx(torch.finfo(dtype).max, rel=1e-6)
    check_merge_against_reference(m, inside, xc_in, 1.0, 0.0, magnitude, assert_close)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_half_restore_saturates(backend, device, dtype):
    """A restored value beyond a half dtype's range (from a pair built by hand: a merge retains
    such tokens) is its largest number with its sign, not inf; NaN stays NaN; decode_attention's
    output likewise (also where its float32 sums overflow, or an input was inf)."""
    big = torch.finfo(dtype).max
    xp = torch.zeros(1, 1, 4, 16, device=device)
    xp[..., 0], xp[..., 1] = 1.0, 0.085
    xc = torch.zeros_like(xp)
    xc[..., 0] = 1
    xp[0, 0, 1] *= -1
    xc[0, 0, 1] *= -1
    xp, xc = xp.to(dtype), xc.to(dtype)
    m = minitriton.merge(xp, xc, 1.0, 0.0)          # e: the first axis, with its sign
    assert m.num_retained == 0
    m = dataclasses.replace(m, mag_prev=torch.full_like(m.mag_prev, 1.003 * big))
    got = minitriton.restore(m, "prev")
    want = (m.mag_prev.double().unsqueeze(-1) * m.e.double())
    assert (want[..., 0].abs() > big * (1 + UNIT[dtype] / 2)).all()   # rounds to inf unclamped
    assert torch.isfinite(got).all()
    assert torch.equal(got[..., 0].double(), torch.sign(want[..., 0]) * big)
    assert_close(got[..., 1:], want[..., 1:], dtype, what="restore below the range")
    q = torch.zeros(1, 2, 16, device=device, dtype=dtype)                 # uniform weights
    keep = slice(2, 4)                                                    # same-sign tokens
    m2 = dataclasses.replace(minitriton.merge(xp[:, :, keep], xc[:, :, keep], 1.0, 0.0),
                             mag_prev=torch.full((1, 1, 2), 1.003 * big, device=device))
    o = minitriton.decode_attention(q, m2, m2, layer="prev")
    assert torch.isfinite(o).all() and (o[..., 0] == big).all()
    nan_pair = dataclasses.replace(m, mag_prev=torch.full_like(m.mag_prev, math.nan))
    assert torch.isnan(minitriton.restore(nan_pair, "prev")).all()
    v_tail = torch.zeros(1, 1, 2, 16, device=device, dtype=dtype)        # (inf saturates too)
    v_tail[0, 0, 0, 1] = math.inf
    o = minitriton.decode_attention(q, m2, m2, layer="prev", k_tail=torch.zeros_like(v_tail),
                                    v_tail=v_tail)
    assert (o[..., 1] == big).all() and torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_huge_magnitudes(backend, device, dtype):
    """Vectors whose squared norm overflows float32 (|x| far above 1.8e19) merge like any
    other: the reference's e and magnitudes, and restores with their magnitudes."""
    xp, xc = make_pair(2, 2, 11, 48, torch.float32, device, seed=3, outliers=2, scale=1e30)
    xp[0, 0, :4] *= 1e-18                        # some rows in range, next to huge partners
    xp, xc = xp.to(dtype), xc.to(dtype)
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.6, 0.2, magnitude)
        check_merge_against_reference(m, xp, xc, 0.6, 0.2, magnitude, assert_close)
        n = torch.linalg.vector_norm(xp.double(), dim=-1)
        if magnitude == "norm":
            got = torch.linalg.vector_norm(minitriton.restore(m, "prev").double(), dim=-1)
            assert ((got - n).abs() <= (2 * UNIT[dtype] + 1e-6) * n).all()
    # Rows at the scaling cutoff (D = 256 components near 2^56 .. 2^60), a huge vector next to
    # a zero one at t = 1, where it keeps its own direction, and one with a 3e38 component.
    D = 256
    xp = torch.randn(1, 1, 4, D, generator=torch.Generator().manual_seed(1))
    xc = xp.flip(-1).clone()
    xp[0, 0, 0], xp[0, 0, 1] = 2.0 ** 60, 2.0 ** 56
    xp[0, 0, 2, :8] = 2.0 ** 59
    xc[0, 0, 3] = 0
    xp[0, 0, 3] *= 1e30
    xp, xc = torch.cat([xp, xp[:, :, :1] * 0.5], 2), torch.cat([xc, xc[:, :, :1]], 2)
    xp[0, 0, 4, 1] = 3e38                # near float32's largest (1 / 3e38 is subnormal)
    xp, xc = xp.to(device, dtype), xc.to(device, dtype)
    for t in (0.5, 1.0):
        for magnitude in ("norm", "projection"):
            m = minitriton.merge(xp, xc, t, 0.0, magnitude)
            check_merge_against_reference(m, xp, xc, t, 0.0, magnitude, assert_close)
            assert all(torch.isfinite(x).all() for x in (*m.tensors(), *minitriton.restore(m)))


@triton.jit
def _scale_rows(x_ptr, r_ptr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """The merge kernel's `_row_scale` of a [BLOCK_S, BLOCK_D] tile: r per row."""
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    tl.store(r_ptr + o_s, _row_scale(tl.load(x_ptr + o_s[:, None] * BLOCK_D + o_d[None, :])))


def test_row_scale_stays_normal(device):
    """The merge kernel's scaling of rows with huge components: a factor that is a normal float
    up to float32's largest value (a GPU's division may flush a subnormal one to 0, as
    1 / max would be above 2^126), bringing the largest component to 2^55; 1 for rows within
    range; 0 for a row with an inf, so that its norm is NaN."""
    fmax = torch.finfo(torch.float32).max
    tops = [0.0, 1.0, 2.0 ** 56, 2.0 ** 56 * (1 + 2 ** -23), 2.0 ** 57, 3e20, 2.0 ** 126,
            2.0 ** 127, 3e38, fmax, math.inf, -fmax, 1e-30, 7e37, 2.0 ** 100 * 1.5, 123.0]
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    x[torch.arange(16), torch.arange(16)] = torch.tensor(tops)
    r = torch.full((16,), math.nan, device=device)
    _scale_rows[(1,)](x.to(device), r, BLOCK_S=16, BLOCK_D=16)
    tiny = torch.finfo(torch.float32).tiny
    for v, f in zip(tops, r.cpu().double().tolist()):
        v = abs(v)
        if v <= 2.0 ** 56:
            assert f == 1, (v, f)
        elif math.isinf(v):
            assert f == 0, (v, f)
        else:
            assert f >= tiny, (v, f)
            assert v * f == pytest.approx(2.0 ** 55, rel=1e-6), (v, f)


def test_row_scale_of_tiny_rows(device):
    """Rows whose components are all below 2^-40 (zero rows too) are scaled up by 2^96 (a
    power of two: exact), into the range where their squares are normal floats; a row with
    one component at 2^-40 or above is not."""
    tops = [0.0, 1e-45, 1e-40, 1e-38, 1e-30, 2.0 ** -40 * (1 - 2 ** -24), 2.0 ** -40, 1e-12]
    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) * 1e-45   # (subnormal)
    x[torch.arange(8), torch.arange(8)] = torch.tensor(tops)
    x[0] = 0
    x[::2] *= -1
    r = torch.full((8,), math.nan, device=device)
    _scale_rows[(1,)](x.to(device), r, BLOCK_S=8, BLOCK_D=16)
    assert r.cpu().tolist() == [2.0 ** 96] * 6 + [1.0, 1.0]


def test_tuning_leaves_no_row_extremes_behind(device, monkeypatch):
    """The merge kernel folds each row's d_min / d_max in with atomics. Autotuning runs every
    config on the caller's tensors before the chosen one; the extremes must be back at their
    start values after each of those runs, or the call keeps the extremes over all configs
    (which reduce over D in different orders). Here the merge kernel runs through triton's
    Autotuner with two configs and a benchmarker that, after each run, reads the extremes."""
    from triton.runtime.autotuner import Autotuner

    from minitriton.kernels import merge as km
    from minitriton.kernels.common import version

    if device.type == "cpu" and version(triton.__version__) < (3, 3):
        pytest.skip("triton 3.2's interpreter refuses the launch options the Autotuner passes")
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    seen = []

    def bench(kernel_call, quantiles):
        kernel_call()
        seen.append((tuner.nargs["dmin_ptr"].clone(), tuner.nargs["dmax_ptr"].clone()))
        return [1.0 + len(seen)] * len(quantiles)

    configs = [triton.Config({"BLOCK_S": bs}, num_warps=4, num_stages=1) for bs in (8, 16)]
    tuner = Autotuner(km._merge_kernel, km._merge_kernel.arg_names, configs, ["D", "BLOCK_D"],
                      reset_to_zero=None, restore_value=list(km._merge_autotuned.restore_value),
                      do_bench=bench)
    monkeypatch.setattr(km, "_merge_autotuned", tuner)
    x_prev, x_cur = make_pair(2, 3, 37, 32, torch.float32, device, seed=3)
    m = minitriton.merge(x_prev, x_cur, t=0.6, gamma=0.05)
    assert len(seen) == 2
    for d_min, d_max in seen:
        assert (d_min == 2.0).all() and (d_max == -1.0).all()
    ref = merge_ref(x_prev.cpu().double().numpy(), x_cur.cpu().double().numpy(), 0.6, 0.05)
    assert_close(m.d_min.cpu(), torch.from_numpy(ref["d_min"]).float(), torch.float32)


@pytest.mark.parametrize("scale", [1e-18, 1e-22, 1e-30, 1e-35])
def test_tiny_vectors(backend, device, scale):
    """Vectors whose squares underflow float32 (|x| below ~1e-19, down to float32's smallest
    normal number, 1.2e-38) merge as any other on both backends: the reference's e,
    magnitudes and retention (each row is scaled up first, or recomputed from its scaled
    vector). A shorter vector counts as a zero vector: e is its partner's direction, d = 1/2,
    its magnitude 0."""
    xp, xc = make_pair(1, 2, 9, 32, torch.float32, device, seed=12, outliers=1)
    xp[0, 1] = xp[0, 1] * 1e-3                 # partners of different sizes
    xp, xc = xp * scale, xc * scale
    xp[0, 0, 3] = 0.0                          # next to a zero vector
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.6, 0.2, magnitude)
        n_e = torch.linalg.vector_norm(m.e.double(), dim=-1)
        n_e[0, 0, 3] = 1.0                     # (e there is u_cur)
        assert ((n_e - 1).abs() < 1e-5).all(), (magnitude, n_e.min(), n_e.max())
        assert all(torch.isfinite(x).all() for x in m.tensors())
        check_merge_against_reference(m, xp, xc, 0.6, 0.2, magnitude, assert_close)
        if magnitude == "norm":                # |x_hat| = |x| where merged
            for x, x_hat in zip((xp, xc), minitriton.restore(m)):
                n, n_hat = (torch.linalg.vector_norm(y.double(), dim=-1) for y in (x, x_hat))
                assert ((n_hat - n).abs() <= 2e-6 * n).all(), (n_hat / n).aminmax()
    # Shorter than 1.2e-38 (subnormal components): a zero vector, on both backends as in the
    # reference.
    xc[0, 0, 2] = xc[0, 0, 2] / scale * 1e-41
    assert 0 < torch.linalg.vector_norm(xc[0, 0, 2].double()) < torch.finfo(torch.float32).tiny
    m = minitriton.merge(xp, xc, 0.6, 0.0)
    check_merge_against_reference(m, xp, xc, 0.6, 0.0, "norm", assert_close)
    u = xp[0, 0, 2].double() / torch.linalg.vector_norm(xp[0, 0, 2].double())
    assert_close(m.e[0, 0, 2], u, torch.float32, what="e next to a subnormal partner")
    assert m.mag_cur[0, 0, 2] == 0 and not minitriton.restore(m, "cur")[0, 0, 2].any()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # (numpy)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_lengths_near_float32_max(backend, device, dtype):
    """Vectors a little shorter than float32's largest number merge as any other, and just
    shorter ones (within the rounding of a float32 norm, where a backend may find them longer
    and keep them) give finite magnitudes in both modes (x . e may round past the largest
    number: it is clamped), and finite restores."""
    fmax = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 12, 16, generator=g, dtype=torch.float64)
    u[..., 4:] = 0                              # a few large components
    u /= torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    near = 1 - 1e-6 if dtype == torch.float32 else 1 - 1e-2      # (bfloat16 rounds by 2^-9)
    for length, exact in ((fmax * near, True), (fmax * (1 - 3e-8), False)):
        xp = (u * length).to(dtype)
        xc = (xp.double() * (1 - 1e-3 * torch.rand(u.shape, generator=g, dtype=torch.float64)))
        xp, xc = xp.to(device), xc.to(dtype).to(device)
        for magnitude in ("norm", "projection"):
            m = minitriton.merge(xp, xc, 0.5, 0.0, magnitude)
            for x in (*m.tensors(), *minitriton.restore(m)):
                assert torch.isfinite(x).all(), (magnitude, length)
            if exact:
                assert m.num_retained == 0
                check_merge_against_reference(m, xp, xc, 0.5, 0.0, magnitude, assert_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_zero_vectors(backend, device, dtype, magnitude):
    """Zero vectors restore to zero (SPEC property 8), with either magnitude."""
    xp, xc = make_pair(1, 2, 8, 32, dtype, device, seed=9)
    xp[0, 0, 1] = 0
    xc[0, 0, 2] = 0
    xp[0, 1, 3] = 0
    xc[0, 1, 3] = 0
    m = minitriton.merge(xp, xc, 0.6, 0.0, magnitude=magnitude)
    xp_hat, xc_hat = minitriton.restore(m)
    assert (xp_hat[0, 0, 1] == 0).all() and (xc_hat[0, 0, 2] == 0).all()
    assert (xp_hat[0, 1, 3] == 0).all() and (xc_hat[0, 1, 3] == 0).all()
    assert m.mag_prev[0, 0, 1] == 0 and m.mag_cur[0, 0, 2] == 0
    # A zero partner leaves the other layer's direction: e = u_cur at (0, 0, 1).
    u = xc[0, 0, 1].double() / torch.linalg.vector_norm(xc[0, 0, 1].double())
    assert_close(m.e[0, 0, 1], u, dtype, what="e next to a zero vector")
    check_merge_against_reference(m, xp, xc, 0.6, 0.0, magnitude, assert_close)


@pytest.mark.parametrize("t", [0.5, 0.6, 0.3])
def test_antiparallel(backend, device, t):
    xp, _ = make_pair(1, 1, 6, 64, torch.float32, device, seed=12)
    xc = -2.0 * xp
    m = minitriton.merge(xp, xc, t, 0.0)
    u_c = xc / torch.linalg.vector_norm(xc, dim=-1, keepdim=True)
    expect = u_c if t >= 0.5 else -u_c      # nlerp (1 - 2t) u_p, or u_c when that is zero
    assert_close(m.e, expect, torch.float32, what="e of antiparallel pairs")
    assert torch.isfinite(m.mag_prev).all()
    assert_close(m.d_max, torch.ones(1, 1), torch.float32, what="d of antiparallel pairs")


def _pairs_at_angles(omegas, D, device, dtype, seed=0):
    """One token pair per angle, `[1, 1, len(omegas), D]`: |x_prev| = 2, |x_cur| = 3, each pair
    in its own random plane."""
    g = torch.Generator().manual_seed(seed)
    xp, xc = [], []
    for om in omegas:
        q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
        u, w = q[:, 0], q[:, 1]
        xp.append(2.0 * u)
        xc.append(3.0 * (math.cos(om) * u + math.sin(om) * w))
    as_in = (lambda v: torch.stack(v).view(1, 1, len(omegas), D).to(dtype).to(device))
    return as_in(xp), as_in(xc)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_nearly_antiparallel(backend, device, dtype, magnitude):
    """Near Omega = pi the SLERP weights grow like 1 / sin(Omega): e must still be a unit vector
    and match the reference up to float32's own conditioning there (eps / sin(Omega)).
    The angles stay clear of the switch to the linear interpolation at sin(Omega) = SIN_EPS."""
    deltas = [0.5, 0.2, 0.05, 1e-2, 3e-3, 1e-3, 3e-4, 3e-5, 1e-5]
    xp, xc = _pairs_at_angles([math.pi - dl for dl in deltas], 80, device, dtype)
    for t in (0.0, 0.3, 0.45, 0.5, 0.55, 1.0):
        m = minitriton.merge(xp, xc, t, 0.0, magnitude=magnitude)
        r = merge_ref(xp, xc, t, 0.0, magnitude)
        what = f"t={t}"
        n_e = torch.linalg.vector_norm(m.e.double(), dim=-1)
        assert_close(n_e, torch.ones_like(n_e), dtype, what=f"|e| {what}")
        sin = np.maximum(np.sin(r["d"] * np.pi), 1e-5)[..., None]        # [1, 1, S, 1]
        cond = 1.0 + 4 * np.finfo(np.float32).eps / sin / TOL_E[dtype]
        assert_close(m.e, r["e"], dtype, scale=cond, what=f"e {what}")
        if magnitude == "projection":
            for got, want, x in ((m.mag_prev, r["mag_prev"], xp), (m.mag_cur, r["mag_cur"], xc)):
                assert_close(got, want, dtype, scale=token_norms(x)[..., 0] * cond[..., 0],
                             what=f"projection {what}")
        xp_hat, xc_hat = minitriton.restore(m)
        if magnitude == "norm":   # magnitudes survive however ill conditioned e is
            for x, x_hat in ((xp, xp_hat), (xc, xc_hat)):
                n = torch.linalg.vector_norm(x.double(), dim=-1)
                assert_close(torch.linalg.vector_norm(x_hat.double(), dim=-1), n, dtype,
                             scale=n, what=f"|x_hat| {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("t", [0.0, 1e-8, 0.5, 1.0 - 1e-8, 1.0])
def test_zero_partner_keeps_the_other_direction(backend, device, dtype, t):
    """Next to a zero vector the other layer keeps its direction at every t, t = 0 and 1
    included (there SLERP's own weight for it is 0): its magnitude survives, the zero vector
    restores to zero, and two zero vectors give e = 0."""
    xp, xc = make_pair(1, 2, 6, 48, dtype, device, seed=4)
    xp[0, 0, 1] = 0          # prev zero
    xc[0, 0, 3] = 0          # cur zero
    xp[0, 1, 2] = 0          # both zero
    xc[0, 1, 2] = 0
    m = minitriton.merge(xp, xc, t, 0.0)
    xp_hat, xc_hat = minitriton.restore(m)
    unit = (lambda x: x.double() / torch.linalg.vector_norm(x.double()))
    assert_close(m.e[0, 0, 1], unit(xc[0, 0, 1]), dtype, what="e next to a zero x_prev")
    assert_close(m.e[0, 0, 3], unit(xp[0, 0, 3]), dtype, what="e next to a zero x_cur")
    assert (m.e[0, 1, 2] == 0).all()
    assert (xp_hat[0, 0, 1] == 0).all() and (xc_hat[0, 0, 3] == 0).all()
    assert (xp_hat[0, 1, 2] == 0).all() and (xc_hat[0, 1, 2] == 0).all()
    assert_close(xc_hat[0, 0, 1], xc[0, 0, 1], dtype, scale=token_norms(xc[0, 0, 1]),
                 what="x_cur next to a zero x_prev")
    assert_close(xp_hat[0, 0, 3], xp[0, 0, 3], dtype, scale=token_norms(xp[0, 0, 3]),
                 what="x_prev next to a zero x_cur")
    check_merge_against_reference(m, xp, xc, t, 0.0, "norm", assert_close)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_nan_token_leaves_other_rows_alone(backend, device, dtype):
    """A NaN in one (b, h) row changes nothing in the others, bit for bit, even where they hold
    the rare tokens that take extra work (nearly parallel, nearly antiparallel, zero)."""
    D = 48
    xp1, xc1 = _pairs_at_angles([1e-3, 0.7, 1.3, math.pi - 0.3, 2.0, 0.4], D, device, dtype)
    xc1[0, 0, 5] = 0.0
    xp0, xc0 = make_pair(1, 1, 6, D, dtype, device, seed=3)
    xp0[0, 0, 2] = float("nan")
    xp, xc = torch.cat([xp0, xp1]), torch.cat([xc0, xc1])
    for magnitude in ("norm", "projection"):
        both = minitriton.merge(xp, xc, 0.6, 0.3, magnitude)
        alone = minitriton.merge(xp1, xc1, 0.6, 0.3, magnitude)
        for name in ("e", "mag_prev", "mag_cur", "retained", "d_min", "d_max"):
            assert torch.equal(getattr(both, name)[1:], getattr(alone, name)), name
        check_merge_against_reference(alone, xp1, xc1, 0.6, 0.3, magnitude, assert_close)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (numpy)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_non_finite_tokens_are_kept(backend, device, dtype, layout):
    """A token pair with a NaN or inf component, in either layer, has no angle: it is retained
    (its originals restore bit for bit), its e and magnitudes are 0, and its row is merged as if
    it were not there (the same retention and extremes as the row without it). (S fills whole
    tiles, so that the all-bad row's extremes come from its tokens, not from padding.) gamma = 0
    retains them only; a streaming merge keeps the rule. The same holds for a finite vector
    longer than float32's largest number (float32 and bfloat16), whose magnitude float32 cannot
    hold."""
    B, H, S, D = 2, 3, 32, 40
    xp, xc = make_pair(B, H, S, D, dtype, device, seed=5, layout=layout, outliers=2)
    nan, inf = float("nan"), float("inf")
    xp[0, 0, 2, 7] = nan                                   # in one layer
    xc[0, 1, 5, 0], xp[0, 1, 5, 3] = inf, -inf             # in both
    xc[1, 0, :, 1] = nan                                   # every token of a row
    xp[1, 2, 0, D - 1], xc[1, 2, S - 1, 0] = inf, nan      # a row's first and last tokens
    xc[0, 0, 8], xp[0, 0, 8, 0] = 0.0, nan                 # next to a zero vector
    xp[1, 1, 3], xc[1, 1, 3, 5] = 0.0, -inf
    long = dtype != torch.float16           # (float16 vectors are far shorter)
    if long:                                 # finite, with norms of 4.2e38 and 4.4e38
        xp[0, 2, 4, :2] = 3e38
        xc[1, 1, 10, :3], xp[1, 1, 10, :2] = 2.5e38, 2.2e38
        xp[0, 2, 6, :2] = 2.2e38             # (3.1e38: merged as any other)
    fmax = torch.finfo(torch.float32).max
    bad = ~(torch.isfinite(xp).all(-1) & torch.isfinite(xc).all(-1)
            & (torch.from_numpy(token_norms(xp)[..., 0]) <= fmax).to(device)
            & (torch.from_numpy(token_norms(xc)[..., 0]) <= fmax).to(device))
    assert int(bad.sum()) == 6 + S + 2 * long
    assert torch.isfinite(xp).all(-1)[0, 2].all() and torch.isfinite(xc).all(-1)[1, 1, 10]
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.6, 0.3, magnitude)
        assert m.retained[bad].all()
        assert (m.e[bad] == 0).all()
        assert (m.mag_prev[bad] == 0).all() and (m.mag_cur[bad] == 0).all()
        check_merge_against_reference(m, xp, xc, 0.6, 0.3, magnitude, assert_close)
        assert m.d_min[1, 0] == 2.0 and m.d_max[1, 0] == -1.0   # the extremes of nothing
        for b, h in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2)):
            ok = ~bad[b, h]
            alone = minitriton.merge(xp[b:b + 1, h:h + 1, ok], xc[b:b + 1, h:h + 1, ok], 0.6,
                                     0.3, magnitude)
            assert torch.equal(m.retained[b, h, ok], alone.retained[0, 0]), (b, h)
            assert m.d_min[b, h] == alone.d_min[0, 0] and m.d_max[b, h] == alone.d_max[0, 0]
    assert torch.equal(minitriton.merge(xp, xc, 0.6, 0.0).retained, bad)
    first = minitriton.merge(xp[:, :, :S // 2], xc[:, :, :S // 2], 0.6, 0.3)
    d_range = (first.d_min, first.d_max)
    second = minitriton.merge(xp[:, :, S // 2:], xc[:, :, S // 2:], 0.6, 0.3, d_range=d_range)
    assert second.retained[bad[:, :, S // 2:]].all()
    check_merge_against_reference(second, xp[:, :, S // 2:], xc[:, :, S // 2:], 0.6, 0.3, "norm",
                                  assert_close, d_range=d_range)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_e_is_rounded_once(backend, device, dtype, magnitude):
    """e is computed in float32 and rounded once to the dtype: each component is within one
    ulp of the exact (float64) direction, relative to its own size (a tolerance by the dtype's
    scale would let half-precision arithmetic through on the small components)."""
    xp, xc = make_pair(2, 3, 29, 96, dtype, device, seed=81, outliers=3, scale=3.0)
    m = minitriton.merge(xp, xc, 0.35, 0.2, magnitude)
    ref = merge_ref(xp.cpu().double().numpy(), xc.cpu().double().numpy(), 0.35, 0.2,
                    magnitude)["e"]
    err = np.abs(m.e.cpu().double().numpy() - ref)
    # (float32's own arithmetic: a few roundings of each component, and of its largest terms
    # for a component that cancels to near 0)
    bound = (2 * UNIT[dtype] + 8 * np.finfo(np.float32).eps) * np.abs(ref) + 1e-7
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (worst, err[worst], ref[worst])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_inputs_not_modified(backend, device, dtype, layout):
    xp, xc = make_pair(2, 2, 11, 32, dtype, device, layout=layout, outliers=1)
    xc[0, 1, 3] = -xp[0, 1, 3]           # antiparallel and zero: the rare tokens' paths
    xp[1, 0, 4] = 0
    before = (xp.clone(), xc.clone())
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.5, 0.2, magnitude)
        minitriton.restore(m)
    assert torch.equal(xp, before[0]) and torch.equal(xc, before[1])


def test_views_with_the_negation_bit(backend, device):
    """A view with torch's lazy negation bit (its storage holds -x) merges, restores and
    attends as its values do: the kernels read storage, so such a view is materialised."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 2, 9, 32, dtype=torch.complex64, generator=g).to(device)
    xp = z.conj().imag                                   # is_neg(): storage holds -imag
    xc = torch.randn(1, 2, 9, 32, generator=g).to(device)
    assert xp.is_neg()
    m = minitriton.merge(xp, xc, 0.6, 0.3)
    want = minitriton.merge(xp.resolve_neg(), xc, 0.6, 0.3)
    assert m.num_retained > 0 and torch.equal(m.retained, want.retained)
    assert torch.equal(m.kept_prev, xp[m.retained].resolve_neg())
    for a, b in zip(m.tensors(), want.tensors()):
        assert torch.equal(a, b)
    neg_e = torch.complex(torch.zeros_like(m.e), -m.e).conj().imag      # holds e, stores -e
    m_neg = dataclasses.replace(m, e=neg_e)
    assert neg_e.is_neg() and torch.equal(neg_e, m.e)
    for a, b in zip(minitriton.restore(m_neg), minitriton.restore(m)):
        assert torch.equal(a, b)
    q = torch.randn(1, 4, 32, dtype=torch.complex64, generator=g).to(device).conj().imag
    o = minitriton.decode_attention(q, m_neg, m, layer="cur", k_tail=xp[:, :, :3],
                                    v_tail=xp[:, :, 3:6])
    o_want = minitriton.decode_attention(q.resolve_neg(), m, m, layer="cur",
                                         k_tail=xp[:, :, :3].resolve_neg(),
                                         v_tail=xp[:, :, 3:6].resolve_neg())
    assert_close(o, o_want, torch.float32, what="decode over negation-bit views")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_s_one_and_empty_rows(backend, device, dtype):
    """A row of one token retains nothing, even at gamma = 1 (it is its row's least distant);
    a row whose tokens are all padding has no extremes (2 and -1, what an empty row starts
    from) and retains nothing."""
    xp, xc = make_pair(2, 2, 1, 16, dtype, device)
    m = minitriton.merge(xp, xc, 0.6, 1.0)
    assert m.num_retained == 0
    check_merge_against_reference(m, xp, xc, 0.6, 1.0, "norm", assert_close)
    xp, xc = make_pair(2, 2, 5, 16, dtype, device, seed=3)
    pads = torch.tensor([[True] * 5, [False] * 5], device=device)
    m = minitriton.merge(xp, xc, 0.6, 1.0, mask=pads)
    assert (m.d_min[1] == 2).all() and (m.d_max[1] == -1).all()
    assert not m.retained[1].any() and (m.retained[0].sum(-1) == 4).all()
    check_merge_against_reference(m, xp, xc, 0.6, 1.0, "norm", assert_close, mask=pads)


# ---- chunks (streaming merge) ----------------------------------------------------------------
def test_chunked_merge_with_d_range(backend, device):
    xp, xc = make_pair(2, 2, 30, 32, torch.float32, device, seed=21, outliers=3)
    first = minitriton.merge(xp[:, :, :20], xc[:, :, :20], 0.6, 0.1)
    second = minitriton.merge(xp[:, :, 20:], xc[:, :, 20:], 0.6, 0.1,
                              d_range=(first.d_min, first.d_max))
    check_merge_against_reference(second, xp[:, :, 20:], xc[:, :, 20:], 0.6, 0.1, "norm",
                                  assert_close, d_range=(first.d_min, first.d_max))
    # The second chunk's threshold uses the extremes over all 30 tokens: its decisions are the
    # one-shot merge's decisions for those tokens (away from the threshold).
    whole = merge_ref(xp, xc, 0.6, 0.1)
    borderline = borderline_tokens(whole)
    agree = (second.retained.cpu().numpy() == whole["retained"][:, :, 20:])
    assert (agree | borderline[:, :, 20:]).all()
    assert (np.abs(second.d_max.double().cpu().numpy() - whole["d_max"])
            <= d_tolerance(whole["d_max"])).all(), "d_max over both chunks"
    joined = minitriton.MergedPair.cat([first, second])
    assert joined.shape == (2, 2, 30, 32)
    assert torch.equal(joined.retained, torch.cat([first.retained, second.retained], 2))
    a, b = minitriton.restore(joined)
    assert torch.equal(a[joined.retained], xp[joined.retained])
    assert torch.equal(b[joined.retained], xc[joined.retained])
    assert_close(a, torch.cat([minitriton.restore(first)[0], minitriton.restore(second)[0]], 2),
                 torch.float32, scale=token_norms(a))


# ---- padding (mask) ----------------------------------------------------------------------------
def _left_padded(xs, lengths, S, pad):
    """The rows of `xs` (each `[1, H, length, D]`) left-padded to S with `pad`'s states, and
    the `[B, S]` mask (1 for a token)."""
    rows, mask = [], torch.zeros(len(lengths), S, dtype=torch.int64)
    for b, (x, n) in enumerate(zip(xs, lengths)):
        rows.append(torch.cat([pad[b:b + 1, :, :S - n], x[:, :, :n]], dim=2))
        mask[b, S - n:] = 1
    return torch.cat(rows), mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_padded_rows_keep_what_unpadded_rows_keep(backend, device, dtype, magnitude):
    """A left-padded row with its mask gives, at its tokens, the unpadded row's result bit for
    bit (e, magnitudes, retention, d_min / d_max), and never retains padding. The pad states
    here are nearly antiparallel pairs (d near 1): without the mask they would be the rows'
    d_max and move every threshold."""
    S, lengths = 19, [19, 11, 1]
    xp, xc = make_pair(3, 2, S, 48, dtype, device, seed=5, outliers=2)
    pad_p, _ = make_pair(3, 2, S, 48, dtype, device, seed=6)
    pad_c = -pad_p + 0.05 * make_pair(3, 2, S, 48, dtype, device, seed=7)[0]
    rows = [(xp[b:b + 1], xc[b:b + 1]) for b in range(3)]
    pp, mask = _left_padded([r[0] for r in rows], lengths, S, pad_p)
    pc, _ = _left_padded([r[1] for r in rows], lengths, S, pad_c)
    mask = mask.to(device)
    m = minitriton.merge(pp, pc, 0.6, 0.2, magnitude, mask=mask)
    unmasked = minitriton.merge(pp, pc, 0.6, 0.2, magnitude)
    assert not torch.equal(unmasked.d_max, m.d_max)     # (the pads matter without the mask)
    assert not m.retained[~mask.bool().unsqueeze(1).expand_as(m.retained)].any()
    for b, n in enumerate(lengths):
        one = minitriton.merge(xp[b:b + 1, :, :n], xc[b:b + 1, :, :n], 0.6, 0.2, magnitude)
        for name in ("e", "mag_prev", "mag_cur", "retained"):
            got = getattr(m, name)[b:b + 1, :, S - n:]
            assert torch.equal(got, getattr(one, name)), (b, name)
        for name in ("d_min", "d_max"):
            assert torch.equal(getattr(m, name)[b:b + 1], getattr(one, name)), (b, name)
    check_merge_against_reference(m, pp, pc, 0.6, 0.2, magnitude, assert_close,
                                  mask=mask)


@example(S=31, D=33, dtype=torch.bfloat16, gamma=0.3, kind="random", seed=5)
@given(S=st.sampled_from([1, 2, 7, 31]), D=st.sampled_from([16, 33, 128]),
       dtype=st.sampled_from(DTYPES), gamma=st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0, 1),
       kind=st.sampled_from(["left", "random", "none", "all"]), seed=st.integers(0, 2**16))
def test_mask_matches_reference_drawn(backend, device, S, D, dtype, gamma, kind, seed):
    g = torch.Generator().manual_seed(seed)
    xp, xc = make_pair(2, 3, S, D, dtype, device, seed=seed, outliers=1, layout="bshd")
    if kind == "left":
        mask = torch.arange(S)[None, :] >= torch.randint(0, S + 1, (2, 1), generator=g)
    else:
        mask = torch.rand(2, S, generator=g) < {"random": 0.6, "none": 0.0, "all": 1.1}[kind]
    m = minitriton.merge(xp, xc, 0.6, gamma, mask=mask.to(device))
    r = check_merge_against_reference(m, xp, xc, 0.6, gamma, "norm", assert_close,
                                      mask=mask)
    assert not (m.retained.cpu() & ~mask[:, None, :]).any()
    # A row without tokens has the extremes of nothing.
    empty = ~mask.any(-1)
    assert (m.d_min.cpu()[empty] == 2.0).all() and (m.d_max.cpu()[empty] == -1.0).all()
    assert np.array_equal(r["retained"] & ~mask[:, None, :].numpy(),
                          np.zeros_like(r["retained"]))


@given(S=st.sampled_from([1, 2, 7, 31]), D=st.sampled_from([16, 80]),
       dtype=st.sampled_from(DTYPES), gamma=st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0, 1),
       with_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_keep_matches_reference_drawn(backend, device, S, D, dtype, gamma, with_mask, seed):
    """Kept pairs are retained whatever their d and left out of the extremes, with or without
    a padding mask, against the reference."""
    g = torch.Generator().manual_seed(seed)
    xp, xc = make_pair(2, 3, S, D, dtype, device, seed=seed, outliers=1)
    keep = torch.rand(2, S, generator=g) < 0.3
    mask = torch.rand(2, S, generator=g) < 0.7 if with_mask else None
    m = minitriton.merge(xp, xc, 0.6, gamma, keep=keep.to(device),
                         mask=None if mask is None else mask.to(device))
    check_merge_against_reference(m, xp, xc, 0.6, gamma, "norm", assert_close,
                                  mask=mask, keep=keep)


def test_kept_tokens_are_outside_the_merge(backend, device):
    """A pair merged with the first k tokens kept holds, at the other tokens, what the merge of
    those tokens alone holds, bit for bit (e, magnitudes, retention, extremes): the kept tokens
    weigh on nothing. Here they are nearly antiparallel (d near 1): counted, they would be every
    row's d_max. Their originals come back exactly."""
    xp, xc = make_pair(2, 3, 23, 48, torch.bfloat16, device, seed=91, outliers=2)
    xc[:, :, :4] = -xp[:, :, :4]
    keep = torch.zeros(2, 23, dtype=torch.int64, device=device)
    keep[:, :4] = 1
    m = minitriton.merge(xp, xc, 0.6, 0.2, keep=keep)
    rest = minitriton.merge(xp[:, :, 4:], xc[:, :, 4:], 0.6, 0.2)
    assert m.retained[:, :, :4].all()
    for name in ("e", "mag_prev", "mag_cur", "retained"):
        assert torch.equal(getattr(m, name)[:, :, 4:], getattr(rest, name)), name
    assert torch.equal(m.d_min, rest.d_min) and torch.equal(m.d_max, rest.d_max)
    for got, x in zip(minitriton.restore(m), (xp, xc)):
        assert torch.equal(got[:, :, :4], x[:, :, :4])
    plain = minitriton.merge(xp, xc, 0.6, 0.2)
    assert not torch.equal(plain.d_max, m.d_max)         # (they would count without keep)


def test_full_mask_changes_nothing(backend, device):
    """A mask of all tokens (bool or int64) gives the unmasked result, bit for bit."""
    xp, xc = make_pair(2, 2, 23, 64, torch.bfloat16, device, seed=8, outliers=3)
    plain = minitriton.merge(xp, xc, 0.6, 0.3, "projection")
    for mask in (torch.ones(2, 23, dtype=torch.bool), torch.ones(2, 23, dtype=torch.int64)):
        m = minitriton.merge(xp, xc, 0.6, 0.3, "projection", mask=mask.to(device))
        for f in dataclasses.fields(m):
            a, b = getattr(m, f.name), getattr(plain, f.name)
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name


def test_padding_without_an_angle_is_kept(backend, device):
    """Padding whose states have a NaN is kept as it was (as any pair without an angle), so it
    restores to its own states (NaN), not to merged ones."""
    xp, xc = make_pair(1, 2, 9, 32, torch.float32, device, seed=9)
    xp[0, 1, 0, 3] = float("nan")
    xc[0, 0, 5, 2] = float("nan")        # a token without an angle: out of its row's extremes
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]], device=device)
    m = minitriton.merge(xp, xc, 0.6, 0.1, mask=mask)
    assert m.retained[0, 1, 0] and not m.retained[0, 0, :3].any()
    assert torch.isnan(minitriton.restore(m)[0][0, 1, 0, 3])
    assert m.retained[0, 0, 5] and torch.isfinite(m.d_min).all() and torch.isfinite(m.d_max).all()
    assert m.retained[0, 0].sum() < 6        # (a NaN extreme would retain the whole row)
    check_merge_against_reference(m, xp, xc, 0.6, 0.1, "norm", assert_close, mask=mask)


def test_mask_with_d_range(backend, device):
    """A chunk of padding alone leaves the earlier extremes as they were and retains nothing;
    a chunk of tokens is thresholded over the earlier tokens and its own."""
    xp, xc = make_pair(2, 2, 20, 32, torch.float32, device, seed=10, outliers=2)
    first = minitriton.merge(xp[:, :, :12], xc[:, :, :12], 0.6, 0.1)
    d_range = (first.d_min, first.d_max)
    pads = minitriton.merge(xp[:, :, 12:], xc[:, :, 12:], 0.6, 0.1, d_range=d_range,
                            mask=torch.zeros(2, 8, dtype=torch.bool, device=device))
    assert pads.num_retained == 0
    assert torch.equal(pads.d_min, first.d_min) and torch.equal(pads.d_max, first.d_max)
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5], device=device)
    second = minitriton.merge(xp[:, :, 12:], xc[:, :, 12:], 0.6, 0.1, d_range=d_range,
                              mask=mask)
    check_merge_against_reference(second, xp[:, :, 12:], xc[:, :, 12:], 0.6, 0.1, "norm",
                                  assert_close, d_range=d_range, mask=mask)


# ---- bytes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_bytes(backend, device, dtype):
    xp, xc = make_pair(2, 4, 64, 128, dtype, device, seed=1, outliers=2)
    m = minitriton.merge(xp, xc, 0.6, 0.05)
    isz = torch.tensor([], dtype=dtype).element_size()
    tokens, N = 2 * 4 * 64, m.num_retained
    expect = tokens * (128 * isz + 4 + 4 + 4) + 2 * N * 128 * isz + 2 * 2 * 4 * 4
    assert m.nbytes == expect
    assert m.dense_nbytes == 2 * tokens * 128 * isz
    assert math.isclose(m.compression_ratio, m.dense_nbytes / m.nbytes)
    assert m.compression_ratio > 1.7 if dtype != torch.float32 else m.compression_ratio > 1.8
    assert m.to("cpu").nbytes == m.nbytes and m.device.type == device.type
    assert m.to(m.device) is m and m.to(str(m.device)) is m
    if device.type == "cpu":
        assert m.to("cpu:0") is m                       # the same device, another name


def test_repr_is_one_line_of_facts(backend, device):
    xp, xc = make_pair(2, 3, 37, 80, torch.bfloat16, device, seed=2, outliers=2)
    m = minitriton.merge(xp, xc, 0.25, 0.1, "projection")
    text = repr(m)
    assert "\n" not in text and len(text) < 300          # no tensor contents
    assert text.startswith("MergedPair(shape=(2, 3, 37, 80), dtype=bfloat16, device=")
    for part in (f"retained={m.num_retained}/{2 * 3 * 37}", f"nbytes={m.nbytes}",
                 f"compression_ratio={m.compression_ratio:.3f}", "t=0.25", "gamma=0.1",
                 "magnitude='projection'"):
        assert part in text


# ---- projection magnitudes (SPEC property 9) -------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_projection_never_worse_than_norm(backend, device, dtype):
    xp, xc = make_pair(2, 3, 31, 64, dtype, device, seed=13, corr=0.2, outliers=2)
    mn = minitriton.merge(xp, xc, 0.6, 0.05, magnitude="norm")
    mp = minitriton.merge(xp, xc, 0.6, 0.05, magnitude="projection")
    assert torch.equal(mn.retained, mp.retained) and torch.equal(mn.e, mp.e)
    merged = ~mn.retained
    slack = 4 * torch.finfo(dtype).eps
    for x, hn, hp in zip((xp, xc), minitriton.restore(mn), minitriton.restore(mp)):
        err_n = torch.linalg.vector_norm((hn.double() - x.double()), dim=-1)
        err_p = torch.linalg.vector_norm((hp.double() - x.double()), dim=-1)
        n = torch.linalg.vector_norm(x.double(), dim=-1)
        worse = (err_p > err_n + slack * n) & merged
        assert not worse.any(), f"projection worse than norm at {worse.nonzero()[:5].tolist()}"
        assert (err_p[merged] < err_n[merged]).float().mean() > 0.9   # strictly better mostly


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_projection_equals_norm_for_coinciding_directions(backend, device, dtype):
    xp, _ = make_pair(1, 2, 17, 80, dtype, device, seed=14)
    xc = xp * 2.0
    mn = minitriton.merge(xp, xc, 0.6, 0.05, magnitude="norm")
    mp = minitriton.merge(xp, xc, 0.6, 0.05, magnitude="projection")
    n = token_norms(xp)[..., 0]
    assert_close(mp.mag_prev, mn.mag_prev, dtype, scale=n, what="c_prev vs |x_prev|")
    assert_close(mp.mag_cur, mn.mag_cur, dtype, scale=2 * n, what="c_cur vs |x_cur|")


def test_empty_sequence(backend, device):
    xp, xc = make_pair(2, 3, 0, 32, torch.float16, device)
    m = minitriton.merge(xp, xc, 0.6, 0.5)
    assert m.shape == (2, 3, 0, 32) and m.num_retained == 0
    assert (m.d_min == 2.0).all() and (m.d_max == -1.0).all()
    assert m.dense_nbytes == 0 and m.nbytes > 0 and m.compression_ratio == 1.0
    a, b = minitriton.restore(m)
    assert a.shape == (2, 3, 0, 32) and b.shape == (2, 3, 0, 32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B,H", [(0, 2), (2, 0)])
def test_empty_batch_or_heads(backend, device, dtype, B, H):
    """No sequences or no heads: merge, restore and decode give empty results."""
    xp, xc = make_pair(B, H, 5, 16, dtype, device)
    m = minitriton.merge(xp, xc, 0.6, 0.5)
    assert m.shape == (B, H, 5, 16) and m.num_retained == 0 and m.compression_ratio == 1.0
    for x in minitriton.restore(m):
        assert x.shape == (B, H, 5, 16) and x.dtype == dtype
    if H:
        q = torch.randn(B, 2 * H, 16).to(dtype).to(device)
        assert minitriton.decode_attention(q, m, m, layer="cur").shape == (B, 2 * H, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_restore_of_strided_pair(backend, device, dtype):
    """A hand-built pair whose tensors are strided views (each with its own strides) restores
    like its contiguous twin, bit for bit."""
    xp, xc = make_pair(2, 3, 13, 48, dtype, device, seed=31, outliers=2)
    m = minitriton.merge(xp, xc, 0.6, 0.2)
    assert m.num_retained > 1
    ms = strided_twin(m)
    for a, b in zip(minitriton.restore(ms), minitriton.restore(m)):
        assert torch.equal(a, b)
    assert torch.equal(minitriton.restore(ms, layer="cur"), minitriton.restore(m, layer="cur"))


def test_cat_of_independent_merges(backend, device):
    """MergedPair.cat of pairs merged each on its own (no d_range): the fields along S are the
    parts', joined; the retained store in (b, h, s) order; d_min / d_max the extremes over all
    parts (each part holds some of each row's extremes); restore of the joined pair is the
    parts' restores, joined."""
    xp, xc = make_pair(2, 3, 17, 32, torch.float32, device, seed=71, outliers=2)
    xc[0, 0, 2] = -xp[0, 0, 2]        # row (0, 0)'s largest d in the first part,
    xc[1, 2, 15] = xp[1, 2, 15]       # row (1, 2)'s smallest in the last
    cuts = [(0, 5), (5, 6), (6, 17)]
    parts = [minitriton.merge(xp[:, :, a:b], xc[:, :, a:b], 0.6, 0.3) for a, b in cuts]
    joined = minitriton.MergedPair.cat(parts)
    for name in ("e", "mag_prev", "mag_cur", "retained"):
        assert torch.equal(getattr(joined, name), torch.cat([getattr(p, name) for p in parts], 2))
    assert torch.equal(joined.d_min, torch.stack([p.d_min for p in parts]).amin(0))
    assert torch.equal(joined.d_max, torch.stack([p.d_max for p in parts]).amax(0))
    assert not torch.equal(joined.d_min, parts[-1].d_min)
    assert not torch.equal(joined.d_max, parts[-1].d_max)
    assert not torch.equal(joined.d_min, parts[0].d_min)
    assert not torch.equal(joined.d_max, parts[0].d_max)
    ret = joined.retained
    assert torch.equal(joined.kept_prev, xp[ret]) and torch.equal(joined.kept_cur, xc[ret])
    for got, pieces in zip(minitriton.restore(joined), zip(*map(minitriton.restore, parts))):
        assert torch.equal(got, torch.cat(pieces, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_restore_one_layer(backend, device, dtype):
    xp, xc = make_pair(2, 2, 19, 80, dtype, device, seed=41, outliers=2)
    m = minitriton.merge(xp, xc, 0.6, 0.2)
    both = minitriton.restore(m)
    assert torch.equal(minitriton.restore(m, layer="prev"), both[0])
    assert torch.equal(minitriton.restore(m, layer="cur"), both[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["bshd", "sliced", "permuted", "mixed"])
def test_layout_does_not_change_the_result(backend, device, dtype, layout):
    """The same values in another memory layout (a `[B, S, H, D]` buffer, every other element
    of D, D the outermost dim; "mixed": x_prev contiguous, x_cur a `[B, S, H, D]` buffer) merge
    bit for bit as their contiguous copies."""
    B, H, S, D = 2, 3, 11, 40
    if layout == "permuted":   # D outermost: stride 1 along H (no [N, D] view of it)
        g = torch.Generator().manual_seed(61)
        xp, xc = (torch.randn(D, B, S, H, generator=g).to(dtype).permute(1, 3, 2, 0)
                  for _ in range(2))
    elif layout == "mixed":
        xp, xc = make_pair(B, H, S, D, dtype, device, seed=61, layout="bshd", outliers=2)
        xp = xp.contiguous()
    else:   # (made on the device: a copy of a view that is not dense would be contiguous)
        xp, xc = make_pair(B, H, S, D, dtype, device, seed=61, layout=layout, outliers=2)
    xp, xc = xp.to(device), xc.to(device)
    assert layout == "mixed" or not xp.is_contiguous()
    assert not xc.is_contiguous()
    for magnitude in ("norm", "projection"):
        m = minitriton.merge(xp, xc, 0.6, 0.2, magnitude=magnitude)
        c = minitriton.merge(xp.contiguous(), xc.contiguous(), 0.6, 0.2, magnitude=magnitude)
        assert m.retained.any()
        for name in ("e", "mag_prev", "mag_cur", "slot", "kept_prev", "kept_cur", "d_min",
                     "d_max"):
            assert torch.equal(getattr(m, name), getattr(c, name)), (magnitude, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["bshd", "sliced"])
def test_strided_inputs_are_not_copied(device, monkeypatch, dtype, layout):
    """Strided inputs (a `[B, S, H, D]` buffer, every other element of D) are read in place:
    the only allocation as large as an input is e (no hidden `.contiguous()` of a layer; the
    torch path copies chunks of at most 1 MiB per thread). On a CPU this checks the torch path
    (the Triton interpreter itself copies every argument to numpy); on CUDA the kernels (the
    torch path there works on whole tensors, with a float32 temporary of their size)."""
    from minitriton import torch_merge
    monkeypatch.setattr(torch_merge, "_chunk_bytes", lambda: 1 << 20)   # (as on one thread)
    xp, xc = make_pair(2, 4, 2048, 64, dtype, device, layout=layout)
    assert not xp.is_contiguous()
    size = xp.numel() * xp.element_size()
    for backend in (("triton",) if device.type == "cuda" else ("torch",)):
        monkeypatch.setenv("MINITRITON_BACKEND", backend)
        minitriton.merge(xp, xc, 0.6, 0.05)           # (warm-up: compilation, autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            m = minitriton.merge(xp, xc, 0.6, 0.05)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - start - m.nbytes
            assert extra < size // 2, (backend, extra)
            continue
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            m = minitriton.merge(xp, xc, 0.6, 0.05)
        big = [(e.name, e.self_cpu_memory_usage) for e in prof.events()
               if e.self_cpu_memory_usage >= size]
        assert len(big) == 1 and big[0][1] == m.e.numel() * m.e.element_size(), big


# ---- the torch path's chunks -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "sliced"])
@pytest.mark.parametrize("magnitude", ["norm", "projection"])
def test_torch_chunks_do_not_change_the_result(monkeypatch, dtype, layout, magnitude):
    """On a CPU the torch path works through chunks of tokens: any chunk size, a short last
    chunk included, gives the one-chunk result bit for bit, near-parallel, antiparallel and
    zero tokens in later chunks included."""
    from minitriton import torch_merge

    monkeypatch.setenv("MINITRITON_BACKEND", "torch")
    xp, xc = make_pair(2, 3, 23, 48, dtype, "cpu", seed=51, layout=layout, outliers=2)
    xc[1, 2, 17] = xp[1, 2, 17]                # parallel: angle refined
    xc[1, 1, 20] = -xp[1, 1, 20]               # antiparallel at t = 0.5: degenerate
    xp[0, 2, 22] = 0                           # a zero vector in a later chunk
    monkeypatch.setattr(torch_merge, "_chunk_bytes", lambda: 1 << 40)
    whole = minitriton.merge(xp, xc, 0.5, 0.1, magnitude=magnitude)
    assert whole.retained.any()
    for tokens in (1, 5, 64):   # a multiple of nothing in the shape
        monkeypatch.setattr(torch_merge, "_chunk_bytes", lambda tokens=tokens: 8 * 48 * tokens)
        m = minitriton.merge(xp, xc, 0.5, 0.1, magnitude=magnitude)
        for name in ("e", "mag_prev", "mag_cur", "slot", "kept_prev", "kept_cur", "d_min",
                     "d_max"):
            assert torch.equal(getattr(m, name), getattr(whole, name)), (tokens, name)
    check_merge_against_reference(m, xp, xc, 0.5, 0.1, magnitude, assert_close)


def test_torch_chunks_scale_with_threads():
    """1 MiB of both inputs (as float32) per thread of torch's pool, at most 16 MiB."""
    from minitriton import torch_merge

    x = torch.zeros(1, 2, 8192, 128)
    threads = torch.get_num_threads()
    try:
        for n, tokens in ((1, 1024), (2, 2048), (64, 16384)):
            torch.set_num_threads(n)
            assert torch_merge._token_views(x, x, True)[2] == tokens
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_torch_restore_chunks_do_not_change_the_result(monkeypatch, dtype, layout):
    """On a CPU the torch path restores a half-precision pair chunk by chunk along S (through a
    reused float32 buffer): any chunk length gives the one-piece result bit for bit, and the
    retained tokens exactly."""
    import dataclasses

    from minitriton import _upcast

    monkeypatch.setenv("MINITRITON_BACKEND", "torch")
    xp, xc = make_pair(2, 3, 19, 40, dtype, "cpu", seed=61, outliers=2)
    m = minitriton.merge(xp, xc, 0.6, 0.2)
    if layout == "bshd":    # e held as a [B, S, H, D] buffer
        m = dataclasses.replace(m, e=m.e.transpose(1, 2).contiguous().transpose(1, 2))
    whole = [(m.e.float() * mag.unsqueeze(-1)).to(dtype) for mag in (m.mag_prev, m.mag_cur)]
    for x, src in zip(whole, (xp, xc)):
        x[m.retained] = src[m.retained]
    monkeypatch.setattr(_upcast, "MIN_TOKENS", 1)
    for tokens in (1, 4, 19, 64):
        monkeypatch.setattr(_upcast, "UPCAST_BYTES", 4 * 2 * 3 * 40 * tokens)
        assert len(list(_upcast.upcast_chunks(m.e))) == -(-19 // tokens)
        for got, want in zip(minitriton.restore(m), whole):
            assert torch.equal(got, want), tokens
        assert torch.equal(minitriton.restore(m, layer="cur"), whole[1])


def test_launch_grids_fit_cuda_limits(monkeypatch):
    """Merge and restore launch (S tiles, H, B) grids: CUDA allows 2^31 - 1 programs on axis x
    and 65535 on y and z, so a batch beyond 65535 is launched in chunks."""
    import minitriton.kernels.merge as kmerge
    import minitriton.kernels.restore as krestore

    grids = {"merge": [], "restore": [], "mark": [], "number": []}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids[self.name].append(grid(dict(BLOCK_S=8, **kwargs)) if callable(grid)
                                        else grid)
                if self.name == "merge":   # d, d_min, d_max: nothing retained
                    for y in args[5:8]:
                        y.fill_(0.0)
                elif self.name == "mark":  # flags and counts: nothing retained
                    for y in args[6:8]:
                        y.fill_(0)
                elif self.name == "number":
                    args[2].fill_(-1)
            return launch

    monkeypatch.setattr(kmerge, "_merge_autotuned", Recorder("merge"))
    monkeypatch.setattr(kmerge, "_mark_kernel", Recorder("mark"))
    monkeypatch.setattr(kmerge, "_number_kernel", Recorder("number"))
    monkeypatch.setattr(krestore, "_restore_autotuned", Recorder("restore"))
    x = torch.ones(70000, 2, 17, 16)
    m = kmerge.merge_triton(x, x, 0.6, 0.0, "norm")
    krestore.restore_triton(m)
    # (marking and numbering: one program per MARK_TOKENS tokens of a row, on axis x)
    assert grids == {"merge": [(3, 2, 65535), (3, 2, 4465)],
                     "restore": [(3, 2, 65535), (3, 2, 4465)],
                     "mark": [(140000,)], "number": [(140000,)]}
    with pytest.raises(ValueError, match="H=65536 heads"):
        kmerge.merge_triton(torch.ones(1, 65536, 1, 16), torch.ones(1, 65536, 1, 16), 0.6, 0.0,
                            "norm")


def test_batch_chunked_launches(device, monkeypatch):
    """A batch launched in chunks gives the same result as in one launch (here chunks of 2
    sequences: 2, 2, 1)."""
    import minitriton.kernels.common as common

    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    xp, xc = make_pair(5, 2, 19, 32, torch.bfloat16, device, seed=8, outliers=2,
                       layout="bshd")
    whole = minitriton.merge(xp, xc, 0.6, 0.2, "projection")
    monkeypatch.setattr(common, "GRID_YZ_MAX", 2)
    parts = minitriton.merge(xp, xc, 0.6, 0.2, "projection")
    for a, b in zip(whole.tensors(), parts.tensors()):
        assert torch.equal(a, b)
    for a, b in zip(minitriton.restore(parts), restore_whole := minitriton.restore(whole)):
        assert torch.equal(a, b)
    assert torch.equal(minitriton.restore(parts, "cur"), restore_whole[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_marking_across_tiles(device, monkeypatch, dtype):
    """The mark and number kernels cut each row into tiles of MARK_TOKENS tokens, numbered from
    the retained tokens of the tiles before: with tiles of 8 tokens (rows of 3-4 tiles, and
    masks, keep and the half-precision range rule), slots, store and everything else equal
    the marking of whole rows in one tile."""
    import minitriton.kernels.merge as kmerge

    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    xp, xc = make_pair(3, 2, 29, 32, dtype, device, seed=9, outliers=3, layout="bshd")
    if dtype == torch.float16:   # a pair beyond the dtype's range, retained whatever gamma
        big = torch.finfo(dtype).max * 0.75   # (|x| = 1.3 x the largest number)
        xp[1, 0, 17, :3] = big
        xc[1, 0, 17, :3] = big
    mask = torch.ones(3, 29, dtype=torch.bool, device=device)
    mask[2, :11] = False
    keep = torch.zeros(3, 29, dtype=torch.bool, device=device)
    keep[0, 9:12] = True
    for kw in ({}, dict(mask=mask), dict(keep=keep, mask=mask)):
        whole = minitriton.merge(xp, xc, 0.6, 0.3, "projection", **kw)
        with monkeypatch.context() as m:
            m.setattr(kmerge, "MARK_TOKENS", 8)
            tiled = minitriton.merge(xp, xc, 0.6, 0.3, "projection", **kw)
        assert 0 < tiled.num_retained < 3 * 2 * 29
        assert bool(tiled.retained[1, 0, 17]) or dtype != torch.float16
        for a, b in zip(whole.tensors(), tiled.tensors()):
            assert torch.equal(a, b)


def test_pair_saves_loads_and_compares(tmp_path):
    """torch.save / torch.load (weights_only, torch's default, included), pickle and deepcopy
    give the same pair back; == is identity, so `in` and `index` work on lists of pairs."""
    import copy
    import pickle

    x_prev, x_cur = make_pair(1, 2, 9, 16, torch.bfloat16, "cpu", seed=4)
    m = minitriton.merge(x_prev, x_cur, t=0.3, gamma=0.5, magnitude="projection")
    assert m.num_retained > 0
    torch.save(m, tmp_path / "pair.pt")
    copies = [torch.load(tmp_path / "pair.pt", weights_only=True), pickle.loads(pickle.dumps(m)),
              copy.deepcopy(m)]
    for c in copies:
        assert type(c) is minitriton.MergedPair
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(c.tensors(),
                                                                          m.tensors()))
        assert (c.t, c.gamma, c.magnitude) == (m.t, m.gamma, m.magnitude)
        assert c != m and c == c
    pairs = [*copies, m]
    assert m in pairs and pairs.index(m) == 3 and len({m, m, copies[0]}) == 2
    for a, b in zip(minitriton.restore(copies[0]), minitriton.restore(m)):
        assert torch.equal(a, b)


class _Tagged(torch.Tensor):
    """A tensor subclass, as a framework might pass."""


def test_plain_settings_and_tensors_from_any_input(backend, device, tmp_path):
    """Settings given as numpy scalars and inputs of a tensor subclass (or Parameters) give a
    pair of plain floats, str and tensors, on both backends, which loads with weights_only; a
    hand-built pair stores plain settings too; decode's output is a plain tensor."""
    x_prev, x_cur = make_pair(1, 2, 9, 16, torch.float32, device, seed=4)
    m = minitriton.merge(x_prev.as_subclass(_Tagged), torch.nn.Parameter(x_cur), np.float64(0.3),
                         np.float32(0.5), np.str_("projection"))
    assert m.num_retained > 0
    assert all(type(x) is torch.Tensor for x in m.tensors())
    assert [type(v) for v in (m.t, m.gamma, m.magnitude)] == [float, float, str]
    ref = minitriton.merge(x_prev, x_cur, 0.3, 0.5, "projection")
    assert all(torch.equal(a, b) for a, b in zip(m.tensors(), ref.tensors()))
    torch.save(m.to("cpu"), tmp_path / "pair.pt")
    loaded = torch.load(tmp_path / "pair.pt", weights_only=True)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(loaded.tensors(), m.tensors()))
    hand = dataclasses.replace(m, t=np.float32(0.25), gamma=np.float64(0.5),
                               magnitude=np.str_("norm"))
    assert [type(v) for v in (hand.t, hand.gamma, hand.magnitude)] == [float, float, str]
    q = torch.randn(1, 4, 16, device=device).as_subclass(_Tagged)
    tail = torch.randn(1, 2, 3, 16, device=device).as_subclass(_Tagged)
    o = minitriton.decode_attention(q, m, m, layer="cur", k_tail=tail, v_tail=tail)
    assert type(o) is torch.Tensor
