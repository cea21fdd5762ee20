"""Public `merge` and `restore`: validated, then dispatched to the Triton kernels (CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1 with MINITRITON_BACKEND=triton) or the torch path."""

from __future__ import annotations

import torch

from ._checks import (PADDING, check_dense, check_has_data, check_head_dim, check_mask_dtype,
                      check_same, check_tensor, check_unit_interval, plain, token_mask)
from .backend import on_device, select_backend
from .pair import MAGNITUDE_MODES, MergedPair, check_pair, resolve_neg

# Token pairs a merge takes at most: slots (and the kernels' token indices) are int32.
MAX_TOKENS = 2 ** 31 - 1


def merge(x_prev: torch.Tensor, x_cur: torch.Tensor, t: float = 0.6, gamma: float = 0.05,
          magnitude: str = "norm", *, d_range=None, mask=None, keep=None) -> MergedPair:
    """Merge the key (or value) states of two adjacent layers into one MiniCache pair.

    For every token (b, h, s), with norms over D and Omega the angle between the two states:

        e = SLERP(x_prev / |x_prev|, x_cur / |x_cur|; t)     shared unit direction
        magnitudes |x_prev|, |x_cur|  (magnitude="norm", the paper)
                   x_prev . e, x_cur . e  (magnitude="projection": the closest point to x on
                   the line of e, for the same bytes; may be negative)
        d = Omega / pi                                        angular distance in [0, 1]

    A token pair is retained (kept as it was, in both layers) iff
    `d > d_max - (d_max - d_min) * gamma`, with d_min / d_max the extremes of its (b, h) row.

    Accuracy: float32 arithmetic throughout. Near Omega = pi the direction itself is ill
    conditioned (the plane of two nearly antiparallel vectors turns by ~eps / (pi - Omega) when
    either moves by eps), and e's relative error grows to that order (~1e-4 at pi - 1e-3 rad);
    such a pair is usually its row's most distant, retained for any gamma > 0.

    Args:
        x_prev, x_cur: `[B, H, S, D]` states of layer l-1 and layer l; float16, bfloat16 or
            float32 (the same), on one device, any strides (never copied to contiguous).
            16 <= D <= 256. Any |x| up to float32's largest number (3.4e38): a vector whose
            squared norm would overflow is scaled first, as is one whose squares would
            underflow; a vector shorter than float32's smallest normal number (1.2e-38) has
            no direction (a zero vector; with "projection" its x . e is kept as for any
            vector). A token pair with a NaN or inf component, or with a vector longer than
            3.4e38 (no float32 magnitude), in either layer, has no angle: it is always retained
            (its originals come back bit for bit), its e and magnitudes are 0, and its row is
            merged as if it were not there (d_min / d_max are over the other tokens). A
            float16 / bfloat16 pair with a magnitude beyond the dtype's largest number is
            retained too (merged, it would restore beyond the dtype's range), bar padding.
        t: SLERP parameter in [0, 1]; 0 keeps prev's direction, 1 cur's. Default 0.6.
        gamma: retention threshold in [0, 1]; 0 retains nothing, 1 all but the least distant
            (pairs without an angle, above, are retained whatever gamma is).
        magnitude: "norm" (default) or "projection".
        d_range: optional `(d_min, d_max)`, float32 `[B, H]`: angular-distance extremes of
            tokens of the same rows merged earlier (e.g. `(old.d_min, old.d_max)`). The threshold
            then uses the extremes over earlier and new tokens; the result's d_min/d_max too.
            Values outside [0, 1], other than a pair's own 2 / -1 for a row with no token that
            has an angle, are refused on a CPU (on CUDA, where checking would synchronise, a
            NaN is ignored and other values are used as given).
        mask: optional `[B, S]` bool or integer tensor, True / 1 for a token and False / 0 for
            padding (transformers' attention mask, e.g. the pad positions of a left-padded
            batch). Padding is merged like any token (so restore gives it back merged), but it
            is left out of d_min / d_max and never retained (bar a pair without an angle,
            which is always retained): a padded row keeps exactly the tokens the same row
            keeps unpadded. The extremes are then taken from d in one more pass over it and the
            mask (on the Triton path 4 bytes a token, and the mask's byte there and in the
            mark pass). Integer values other than 0 and 1 are refused on a CPU.
        keep: optional `[B, S]` bool or integer tensor, True / 1 for a token pair kept as it
            was (retained, whatever its d, padding too) and left out of d_min / d_max, as a
            token outside the merge would be: e.g. a left-padded row's first tokens, which the
            same row unpadded holds in a dense sink (`MiniCache` does this). Checked as `mask`
            is; the extremes then take the same extra pass.

    Returns:
        A `MergedPair` (see its docstring for the layout; `restore` gives the dense states back).

    Not differentiable: inputs that require grad are read as plain data, and no output requires
    grad (the same on both backends).

    Synchronisation: `merge` synchronises with the host once, to read how many tokens are
    retained and allocate the compact retained store (N rows, no padding), which keeps the
    stored bytes at their minimum. Everything else is asynchronous.

    Bytes (Triton path): each input is read once in the fused pass (e, magnitudes, d, row
    extremes); a mark pass reads d (4 bytes a token) and writes a flag byte, a number pass
    reads the flags and writes the slots, and only the retained tokens are read again.
    Floor = 2 x B*H*S*D*itemsize read + B*H*S*(D*itemsize + 12) written (e, magnitudes, slot)
    + the retained store; the kernels add 10 bytes a token (d written and read, the flag
    written and read; 18 in float16/bfloat16, whose magnitudes are read again for the range
    rule) and 20 a retained token (its index written and read, its d read): 0.7% at D = 128
    in float32, 2.3% in bfloat16. A `mask` or `keep` adds 6 bytes a token (8 with both).

    Example:
        >>> k_prev = torch.randn(1, 8, 1024, 128, dtype=torch.bfloat16)
        >>> k_cur = 0.8 * k_prev + 0.6 * torch.randn_like(k_prev)
        >>> m = minitriton.merge(k_prev, k_cur, t=0.6, gamma=0.05)
        >>> m.compression_ratio, m.retained.float().mean().item()
        >>> k_prev_hat, k_cur_hat = minitriton.restore(m)
    """
    check_tensor("x_prev", x_prev, ndim=4)
    check_tensor("x_cur", x_cur, ndim=4)
    check_same("x_cur", x_cur, "x_prev", x_prev)
    check_has_data("x_prev", x_prev)
    check_head_dim("x_prev", x_prev.shape[-1])
    B, H, S, _ = x_prev.shape
    if B * H * S > MAX_TOKENS:
        raise ValueError(f"x_prev: {B * H * S} token pairs (B*H*S for shape "
                         f"{tuple(x_prev.shape)}); merge takes at most {MAX_TOKENS} (its slots "
                         f"and token indices are int32): merge fewer rows at a time")
    t = check_unit_interval("t", t)
    gamma = check_unit_interval("gamma", gamma)
    if magnitude not in MAGNITUDE_MODES:
        raise ValueError(f"magnitude: expected one of {MAGNITUDE_MODES}, got {magnitude!r}")
    if d_range is not None:
        d_range = _check_d_range(d_range, x_prev)
    if mask is not None:
        mask = _check_mask(mask, x_prev)
    if keep is not None:
        keep = _check_mask(keep, x_prev, "keep")
    # A view with torch's lazy negation bit (e.g. `z.conj().imag`) holds -x in its storage,
    # which is what a kernel reads: such inputs are materialised (no copy for any other).
    # Tensor subclasses are read as plain tensors (what the pair stores is plain).
    x_prev, x_cur = plain(x_prev.resolve_neg()), plain(x_cur.resolve_neg())
    with torch.no_grad():   # not differentiable: inputs that require grad are read as data
        if select_backend(x_prev.device) == "triton":
            from .kernels.merge import merge_triton
            with on_device(x_prev.device):
                return merge_triton(x_prev, x_cur, t, gamma, magnitude, d_range, mask, keep)
        from .torch_merge import merge_torch
        return merge_torch(x_prev, x_cur, t, gamma, magnitude, d_range, mask, keep)


def restore(m: MergedPair, layer: str | None = None):
    """The dense states of both layers, `(x_prev_hat, x_cur_hat)`, each `[B, H, S, D]` in m.dtype;
    with `layer="prev"` or `"cur"`, that layer's tensor only (the other is not computed).

        x_prev_hat = mag_prev * e,  x_cur_hat = mag_cur * e,  retained tokens = their originals
        (bit-exact).

    mag * e is computed in float32 and rounded once to the dtype. In float16/bfloat16, a value
    beyond the dtype's range (only from a pair built by hand: `merge` retains the pairs with a
    magnitude beyond it) saturates at the largest number with its sign instead of becoming
    inf.

    The Triton kernel is autotuned per head dim and dtype: its first call for each benchmarks
    a few tile configs (host synchronisations; MINITRITON_AUTOTUNE=0 before the first Triton
    call takes a fixed config per head dim instead), and the first launch of each kernel
    variant compiles it: run the same call once before capturing it in a CUDA graph.

    A MergedPair built by hand is checked field by field; the values of its `slot` map (-1 or
    the rows of the store, each once) only on a CPU, where reading them costs no host
    synchronisation. (Pairs from `merge` are always consistent.)

    Example:
        >>> x_prev_hat, x_cur_hat = minitriton.restore(minitriton.merge(x_prev, x_cur))
        >>> x_cur_hat = minitriton.restore(m, layer="cur")
    """
    check_pair("m", m)
    check_has_data("m.e", m.e)
    if layer not in (None, "prev", "cur"):
        raise ValueError(f"layer: expected None, 'prev' or 'cur', got {layer!r}")
    m = resolve_neg(m)
    with torch.no_grad():
        if select_backend(m.device) == "triton":
            from .kernels.restore import restore_triton
            with on_device(m.device):
                return restore_triton(m, layer)
        from .torch_merge import restore_torch
        return restore_torch(m, layer)


def _check_d_range(d_range, x: torch.Tensor):
    if not isinstance(d_range, (tuple, list)) or len(d_range) != 2:
        raise TypeError(f"d_range: expected a (d_min, d_max) pair of tensors, got "
                        f"{type(d_range).__name__}")
    B, H = x.shape[:2]
    out = []
    for name, v, empty in zip(("d_range[0]", "d_range[1]"), d_range, (2.0, -1.0)):
        check_tensor(name, v, ndim=2, dtypes=(torch.float32,))
        if tuple(v.shape) != (B, H):
            raise ValueError(f"{name}: expected shape {(B, H)}, got {tuple(v.shape)}")
        if v.device != x.device:
            raise ValueError(f"{name}: device {v.device} does not match x_prev's {x.device}")
        # Extremes are distances in [0, 1], or the start value of a row without a token that
        # has an angle (2 for d_min, -1 for d_max). On CUDA the check would synchronise: it
        # runs on CPU tensors (there a NaN counts as no earlier extreme).
        if v.device.type == "cpu" and v.numel():
            bad = ~(((v >= 0) & (v <= 1)) | (v == empty))
            if bool(bad.any()):
                at = tuple(torch.nonzero(bad)[0].tolist())
                raise ValueError(f"{name}: expected angular-distance extremes in [0, 1] (or "
                                 f"{empty:g} for a row with none), got {v[at].item()!r} at {at}")
        out.append(v)
    return tuple(out)


def _check_mask(mask, x: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """mask (or keep) as a bool `[B, S]` tensor on x's device (a view of a bool mask, else a
    cast)."""
    meaning = PADDING if name == "mask" else "1 for a token kept as it is and 0 otherwise"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a [B, S] bool or integer tensor, got "
                        f"{type(mask).__name__}")
    check_dense(name, mask)
    B, _, S, _ = x.shape
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"{name}: expected shape {(B, S)} ([B, S] of x_prev), got "
                         f"{tuple(mask.shape)}")
    check_mask_dtype(name, mask, meaning)
    if mask.device != x.device:
        raise ValueError(f"{name}: device {mask.device} does not match x_prev's {x.device}")
    return token_mask(name, mask, meaning)
