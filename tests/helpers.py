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


def check_merge_against_reference(m, xp, xc, t, gamma, magnitude, d_tol, assert_close,
                                  d_range=None, mask=None, keep=None):
    """Compare a MergedPair with merge_ref on every stored quantity and the restore."""
    import minitriton

    dtype = xp.dtype
    r = merge_ref(xp, xc, t, gamma, magnitude, d_range=d_range,
                  mask=None if mask is None else mask.cpu(),
                  keep=None if keep is None else keep.cpu(),
                  dtype_max=None if dtype == torch.float32 else torch.finfo(dtype).max)
    retained = m.retained.cpu().numpy()
    if keep is not None:      # (never borderline)
        assert retained[np.broadcast_to(keep.cpu().numpy()[:, None, :] != 0,
                                        retained.shape)].all(), "a kept token was merged"
    borderline = np.abs(r["d"] - r["threshold"][..., None]) <= d_tol
    wrong = (retained != r["retained"]) & ~borderline
    assert not wrong.any(), (f"retention differs from the reference at {int(wrong.sum())} "
                             f"non-borderline tokens, first {np.argwhere(wrong)[:5].tolist()}")
    assert_close(m.d_min.cpu(), r["d_min"], torch.float32, scale=d_tol / 2e-5, what="d_min")
    assert_close(m.d_max.cpu(), r["d_max"], torch.float32, scale=d_tol / 2e-5, what="d_max")
    assert_close(m.e.cpu(), r["e"], dtype, what="e")
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
    for got, x, mag, what in ((xp_hat, r["x_prev"], r["mag_prev"], "prev"),
                              (xc_hat, r["x_cur"], r["mag_cur"], "cur")):
        ref = np.where(keep, x, mag[..., None] * r["e"])
        assert_close(np.where(angle, got.double().cpu().numpy(), 0.0), np.where(angle, ref, 0.0),
                     dtype, scale=token_norms(xp if what == "prev" else xc),
                     what=f"restore {what}")
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

