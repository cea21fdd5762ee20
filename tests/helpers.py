"""Input builders and the reference comparison shared by the merge tests."""

from __future__ import annotations

import numpy as np
import torch

from minitriton.reference import merge_ref


def make_pair(B, H, S, D, dtype=torch.float32, device="cpu", seed=0, corr=0.8,
              layout="bhsd", outliers=0, scale=1.0):
    """Two correlated layers' states `[B, H, S, D]`.

    layout "bhsd": contiguous; "bshd": a `[B, S, H, D]` buffer seen as `[B, H, S, D]` (the
    layout of many attention implementations); "sliced": every other element of D.
    `outliers` tokens per row get an unrelated cur state (the pairs retention should keep).
    """
    g = torch.Generator().manual_seed(seed)
    shape = {"bhsd": (B, H, S, D), "bshd": (B, S, H, D), "sliced": (B, H, S, 2 * D)}[layout]
    xp = torch.randn(shape, generator=g) * scale
    noise = torch.randn(shape, generator=g) * scale
    xc = corr * xp + (1 - corr * corr) ** 0.5 * noise
    if outliers:
        view = xc if layout != "bshd" else xc.transpose(1, 2)
        idx = torch.randint(0, S, (outliers,), generator=g)
        view[:, :, idx] = -view[:, :, idx] + torch.randn(view[:, :, idx].shape, generator=g)
    xp, xc = xp.to(dtype).to(device), xc.to(dtype).to(device)
    if layout == "bshd":
        xp, xc = xp.transpose(1, 2), xc.transpose(1, 2)
    elif layout == "sliced":
        xp, xc = xp[..., ::2], xc[..., ::2]
    return xp, xc


def strided_twin(m):
    """The pair `m` with every tensor a non-contiguous view of the same values, each with its
    own strides: e and mag_prev seen through `[B, S, H, ...]` buffers, mag_cur and slot as
    every other element of longer rows (slot with another step than mag_cur), the retained
    stores as every other column, d_min / d_max transposed."""
    import dataclasses

    def every(x, k):          # x as every k-th element of a buffer k times longer (last dim)
        buf = torch.zeros(*x.shape[:-1], k * x.shape[-1], dtype=x.dtype, device=x.device)
        buf[..., ::k] = x
        return buf[..., ::k]

    def swap12(x):            # x seen through a buffer with dims 1 and 2 swapped
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    twin = dataclasses.replace(
        m, e=swap12(m.e), mag_prev=swap12(m.mag_prev), mag_cur=every(m.mag_cur, 2),
        slot=every(m.slot, 3), kept_prev=every(m.kept_prev, 2), kept_cur=every(m.kept_cur, 3),
        d_min=m.d_min.t().contiguous().t(), d_max=m.d_max.t().contiguous().t())
    for a, b in zip(twin.tensors(), m.tensors()):
        assert torch.equal(a, b)
        assert a.numel() <= 1 or not a.is_contiguous() or a.shape[-1] <= 1
    return twin


def token_norms(x) -> np.ndarray:
    """`[..., 1]` float64 norms, floor 1e-30 (also for tokens with a NaN), for scale-relative
    tolerances."""
    n = np.linalg.norm(x.detach().double().cpu().numpy(), axis=-1, keepdims=True)
    return np.fmax(n, 1e-30)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b hold the same bits (NaN payloads included)."""
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def d_tolerance(d) -> np.ndarray:
    """Per-token tolerance of the angular distance d = Omega / pi (float32 arithmetic): a few
    float32 roundings, growing like 1 / sin(Omega) near Omega = 0 and pi, where the torch
    path's arccos of a rounded cosine is ill conditioned (down to 0.01 rad, where it switches
    to the exact form)."""
    d = np.nan_to_num(np.asarray(d, np.float64))
    return 2e-6 + 2e-6 / np.maximum(np.abs(np.sin(np.pi * d)), 1e-2)


def borderline_tokens(r) -> np.ndarray:
    """Tokens of the reference result `r` close enough to their row's threshold that rounding
    may put them on either side: their own d's tolerance plus the threshold's (d_max and d_min
    each enter it once, d_max twice over when gamma = 1)."""
    thr_tol = 3 * np.maximum(d_tolerance(r["d_min"]), d_tolerance(r["d_max"]))
    return np.abs(r["d"] - r["threshold"][..., None]) <= d_tolerance(r["d"]) + thr_tol[..., None]


def e_tolerance(r, dtype) -> np.ndarray:
    """Per-component tolerance of e against the reference's: its float32 computation (a few
    roundings, and eps / sin(Omega) near pi, where the direction itself is ill conditioned),
    then one rounding to `dtype` (up to an ulp: Triton's interpreter truncates float32 to
    bfloat16), and half-precision subnormals."""
    from conftest import UNIT

    return 2 * UNIT[dtype] * np.abs(r["e"]) + _conditioning(r) + 1e-6 + _subnormal_step(dtype)


def _conditioning(r) -> np.ndarray:
    """`[..., 1]`: float32's error in e's direction, relative to |e| = 1, at the reference's
    angles: 4 eps / sin(Omega) (near pi the direction itself is ill conditioned)."""
    sin = np.maximum(np.abs(np.sin(np.nan_to_num(r["d"]) * np.pi)), 1e-5)[..., None]
    return 4 * np.finfo(np.float32).eps / sin


def _subnormal_step(dtype) -> float:
    """The spacing of `dtype`'s subnormal numbers: the error of rounding a value below its
    smallest normal number."""
    f = torch.finfo(dtype)
    return float(f.tiny * f.eps)


def check_merge_against_reference(m, xp, xc, t, gamma, magnitude, assert_close,
                                  d_range=None, mask=None, keep=None):
    """Compare a MergedPair with merge_ref on every stored quantity and the restore: retention
    (but for tokens within rounding of the threshold), d's extremes, e and the restore each to
    the error their arithmetic allows (`d_tolerance`, `e_tolerance`), the magnitudes to
    float32's, and retained tokens bit for bit."""
    import minitriton
    from conftest import UNIT

    dtype = xp.dtype
    r = merge_ref(xp, xc, t, gamma, magnitude, d_range=d_range,
                  mask=None if mask is None else mask.cpu(),
                  keep=None if keep is None else keep.cpu(),
                  dtype_max=None if dtype == torch.float32 else torch.finfo(dtype).max)
    retained = m.retained.cpu().numpy()
    if keep is not None:      # (never borderline)
        assert retained[np.broadcast_to(keep.cpu().numpy()[:, None, :] != 0,
                                        retained.shape)].all(), "a kept token was merged"
    wrong = (retained != r["retained"]) & ~borderline_tokens(r)
    assert not wrong.any(), (f"retention differs from the reference at {int(wrong.sum())} "
                             f"non-borderline tokens, first {np.argwhere(wrong)[:5].tolist()}")
    for name in ("d_min", "d_max"):
        got = getattr(m, name).double().cpu().numpy()
        off = np.abs(got - r[name]) > d_tolerance(r[name])
        assert not off.any(), (f"{name}: {int(off.sum())} rows off, first "
                               f"{np.argwhere(off)[:3].tolist()}: {got[off][:3]} vs "
                               f"{r[name][off][:3]}")
    e_err = np.abs(m.e.double().cpu().numpy() - r["e"])
    off = ~(e_err <= e_tolerance(r, dtype))
    assert not off.any(), (f"e: {int(off.sum())} components more than a rounding off, first "
                           f"{np.argwhere(off)[:3].tolist()}, worst error "
                           f"{np.nanmax(e_err - e_tolerance(r, dtype)):.3g} over")
    n_p, n_c = token_norms(xp)[..., 0], token_norms(xc)[..., 0]
    # Magnitudes are float32 quantities of the (exact) inputs: float32's tolerance whatever
    # the dtype (projection: x . e with e in float32, before its rounding to the dtype).
    assert_close(m.mag_prev.cpu(), r["mag_prev"], torch.float32, scale=n_p, what="mag_prev")
    assert_close(m.mag_cur.cpu(), r["mag_cur"], torch.float32, scale=n_c, what="mag_cur")
    # Restore, with the implementation's own retention (borderline tokens may differ). Tokens
    # with a NaN or inf component (d = NaN) are compared by their bits below.
    xp_hat, xc_hat = minitriton.restore(m)
    keep = retained[..., None]
    angle = ~np.isnan(r["d"])[..., None]
    cond = _conditioning(r)
    for got, x, mag, what in ((xp_hat, r["x_prev"], r["mag_prev"], "prev"),
                              (xc_hat, r["x_cur"], r["mag_cur"], "cur")):
        ref = np.where(keep, x, mag[..., None] * r["e"])
        # |mag| times e's error, the magnitude's float32 error, one rounding of the product
        # (an ulp at most), half-precision subnormals
        tol = (4 * UNIT[dtype] * np.abs(ref) + (2e-6 + cond) * token_norms(
            xp if what == "prev" else xc) + _subnormal_step(dtype))
        err = np.abs(got.double().cpu().numpy() - ref)
        off = angle & ~(err <= tol)
        assert not off.any(), (f"restore {what}: {int(off.sum())} components off, first "
                               f"{np.argwhere(off)[:3].tolist()}")
    # Retained tokens come back bit-exactly, in both layers.
    mask = m.retained
    assert same_bits(xp_hat[mask], xp[mask]) and same_bits(xc_hat[mask], xc[mask])
    return r


def tiny_llama(**config):
    """A randomly initialised LlamaForCausalLM (sdpa attention) built from `config`, for a
    module-scoped fixture: yields it on one thread (a tiny model runs fastest there and does not
    fight other processes for cores), then restores the thread count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(head_dim=16, **config)
    cfg._attn_implementation = "sdpa"
    try:
        yield LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_num_threads(threads)

