"""`MergedPair`: the compressed cache of one merged layer pair (keys or values).

Layout (all tensors on one device, all contiguous):

    e          [B, H, S, D]  input dtype  shared unit direction of each token pair
    mag_prev   [B, H, S]     float32      layer l-1's magnitude: |x_prev| ("norm") or
                                          x_prev . e ("projection")
    mag_cur    [B, H, S]     float32      layer l's magnitude, same convention
    slot       [B, H, S]     int32        -1 for a merged token; otherwise the row of the
                                          retained store that holds its originals
    kept_prev  [N, D]        input dtype  originals of layer l-1 for the N retained tokens,
                                          rows in (b, h, s) row-major order
    kept_cur   [N, D]        input dtype  originals of layer l, same rows
    d_min      [B, H]        float32      each row's smallest angular distance d = Omega / pi
    d_max      [B, H]        float32      each row's largest angular distance

`retained` (bool `[B, H, S]`) is `slot >= 0`. The retained store is compact (N rows, no
padding), so its size is data dependent; `merge` learns N with one host synchronisation.
`d_min`/`d_max` let a later chunk of the same rows be merged with a threshold that also sees
the earlier tokens (see `merge(..., d_range=...)`), and `MergedPair.cat` joins chunks along S.

Every tensor above counts in `nbytes`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch

from ._checks import (check_dense, check_has_data, check_head_dim, check_tensor,
                      check_unit_interval)

MAGNITUDE_MODES = ("norm", "projection")


@dataclass(frozen=True, repr=False, eq=False)
class MergedPair:
    """The output of `minitriton.merge`: one direction per token pair, two magnitudes, and the
    retained tokens' original states of both layers.

    Attributes (tensors, see the module docstring for the layout): `e`, `mag_prev`, `mag_cur`,
    `slot`, `kept_prev`, `kept_cur`, `d_min`, `d_max`; and the settings `t`, `gamma` and
    `magnitude` ("norm" or "projection").

    `==` compares identity (compare contents field by field, e.g. with `torch.equal`).
    `torch.save` / `torch.load` work, `weights_only=True` (the default) included: importing
    minitriton adds the class to torch's safe globals.

    Example:
        >>> m = minitriton.merge(k_prev, k_cur, t=0.6, gamma=0.05)
        >>> m.shape, m.retained.float().mean().item(), m.compression_ratio
    """

    e: torch.Tensor
    mag_prev: torch.Tensor
    mag_cur: torch.Tensor
    slot: torch.Tensor
    kept_prev: torch.Tensor
    kept_cur: torch.Tensor
    d_min: torch.Tensor
    d_max: torch.Tensor
    t: float
    gamma: float
    magnitude: str = "norm"

    def __post_init__(self):
        # Settings are stored as plain float / str (e.g. a numpy float or numpy.str_ given to a
        # hand-built pair), so that the pair pickles with torch.save and loads with
        # weights_only=True. Their values are checked by the ops that take the pair.
        for name in ("t", "gamma"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if isinstance(self.magnitude, str):
            object.__setattr__(self, "magnitude", str(self.magnitude))

    # ---- shape and type ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, S, D) of each of the two merged inputs."""
        return tuple(self.e.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.e.dtype

    @property
    def device(self) -> torch.device:
        return self.e.device

    @property
    def retained(self) -> torch.Tensor:
        """bool `[B, H, S]`: True where the token pair was kept as it was (not merged)."""
        return self.slot >= 0

    @property
    def num_retained(self) -> int:
        """N, the number of retained token pairs (rows of the retained store)."""
        return int(self.kept_prev.shape[0])

    # ---- bytes ------------------------------------------------------------------------------
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.e, self.mag_prev, self.mag_cur, self.slot, self.kept_prev, self.kept_cur,
                self.d_min, self.d_max)

    @property
    def nbytes(self) -> int:
        """Every byte this pair holds."""
        return sum(x.numel() * x.element_size() for x in self.tensors())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the two dense inputs `[B, H, S, D]` in the input dtype."""
        return 2 * self.e.numel() * self.e.element_size()

    @property
    def compression_ratio(self) -> float:
        """dense_nbytes / nbytes (about 2 for D = 128 and few retained tokens); 1.0 for a pair
        of no tokens (S, B or H of 0), as for a `MiniCache` that holds nothing."""
        dense = self.dense_nbytes
        return dense / self.nbytes if dense else 1.0

    def __repr__(self) -> str:
        """One line: shape, dtype, device, retained tokens, bytes and settings (the tensors
        are fields: `m.e`, `m.mag_prev`, ...)."""
        dtype = str(self.dtype).replace("torch.", "")
        return (f"MergedPair(shape={self.shape}, dtype={dtype}, device={self.device}, "
                f"retained={self.num_retained}/{self.slot.numel()}, nbytes={self.nbytes}, "
                f"compression_ratio={self.compression_ratio:.3f}, t={self.t}, "
                f"gamma={self.gamma}, magnitude={self.magnitude!r})")

    # ---- moves and joins --------------------------------------------------------------------
    def to(self, device) -> "MergedPair":
        """A copy on `device` (a torch.device, a string such as "cuda:0", or a CUDA index), or
        self when already there. The dtype stays: the retained originals must stay exact."""
        if isinstance(device, bool) or not isinstance(device, (torch.device, str,
                                                               numbers.Integral)):
            raise TypeError(f"device: expected a torch.device, a device string or an index, "
                            f"got {type(device).__name__} {device!r}")
        try:
            device = torch.device(device if not isinstance(device, numbers.Integral)
                                  else int(device))
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device: {device!r} is not a usable device ({err})") from None
        if device == self.device:
            return self
        try:
            moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        except (AssertionError, RuntimeError) as err:   # e.g. torch built without CUDA
            raise ValueError(f"device: cannot move a MergedPair to {device} ({err})") from None
        if all(moved[name].device == getattr(self, name).device for name in _TENSOR_FIELDS):
            return self   # the same device under another name (e.g. "cpu:0")
        return replace(self, **moved)

    @staticmethod
    def cat(pairs: "list[MergedPair]") -> "MergedPair":
        """Join pairs of the same B, H, D, dtype, device and settings (t, gamma, magnitude)
        along the token axis S. `pairs`: any sequence or iterable of MergedPairs.

        The retained stores are concatenated and re-ordered so that rows stay in (b, h, s)
        row-major order; `d_min`/`d_max` become the extremes over all pairs.
        """
        if isinstance(pairs, MergedPair) or not hasattr(pairs, "__iter__"):
            raise TypeError(f"pairs: expected a sequence of MergedPairs, got "
                            f"{type(pairs).__name__}")
        pairs = list(pairs)
        if not pairs:
            raise ValueError("pairs: expected at least one MergedPair, got an empty list")
        for i, p in enumerate(pairs):
            check_pair(f"pairs[{i}]", p)
            check_has_data(f"pairs[{i}].e", p.e)
        first = pairs[0]
        if len(pairs) == 1:
            return first
        B, H, _, D = first.shape
        for i, p in enumerate(pairs[1:], 1):
            if (p.shape[0], p.shape[1], p.shape[3]) != (B, H, D) or p.dtype != first.dtype \
                    or p.device != first.device:
                raise ValueError(
                    f"pairs[{i}]: shape {p.shape}, dtype {p.dtype}, device {p.device} do not "
                    f"match pairs[0]'s ({first.shape}, {first.dtype}, {first.device}): the "
                    f"same B, H, D, dtype and device are needed")
            if (p.t, p.gamma, p.magnitude) != (first.t, first.gamma, first.magnitude):
                raise ValueError(
                    f"pairs[{i}]: settings t={p.t}, gamma={p.gamma}, magnitude={p.magnitude!r} "
                    f"differ from pairs[0]'s (t={first.t}, gamma={first.gamma}, "
                    f"magnitude={first.magnitude!r})")
        e = torch.cat([p.e for p in pairs], dim=2)
        mag_prev = torch.cat([p.mag_prev for p in pairs], dim=2)
        mag_cur = torch.cat([p.mag_cur for p in pairs], dim=2)
        retained = torch.cat([p.retained for p in pairs], dim=2)
        # Each pair's store is (b, h, s)-ordered; the joined one must be too. Give every row its
        # joined (b, h, s) position and sort by it.
        keys, offset = [], 0
        for p in pairs:
            S = p.shape[2]
            b, h, s = torch.nonzero(p.retained, as_tuple=True)
            keys.append((b * H + h) * e.shape[2] + s + offset)
            offset += S
        key = torch.cat(keys)
        order = torch.argsort(key)
        kept_prev = torch.cat([p.kept_prev for p in pairs])[order]
        kept_cur = torch.cat([p.kept_cur for p in pairs])[order]
        slot = _slots_from_mask(retained)
        d_min = torch.stack([p.d_min for p in pairs]).amin(0)
        d_max = torch.stack([p.d_max for p in pairs]).amax(0)
        return MergedPair(e, mag_prev, mag_cur, slot, kept_prev, kept_cur, d_min, d_max,
                          first.t, first.gamma, first.magnitude)


_TENSOR_FIELDS = ("e", "mag_prev", "mag_cur", "slot", "kept_prev", "kept_cur", "d_min", "d_max")

# torch.load(weights_only=True) rebuilds only allow-listed classes: a MergedPair is tensors,
# floats and a string, rebuilt without running any code of the file's choosing.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([MergedPair])


def check_pair(name: str, m) -> MergedPair:
    """A MergedPair whose tensors agree with each other (TypeError / ValueError naming the
    field otherwise): what `merge` makes, or a hand-built pair of the same layout."""
    if not isinstance(m, MergedPair):
        raise TypeError(f"{name}: expected a MergedPair (from minitriton.merge), got "
                        f"{type(m).__name__}")
    for field in _TENSOR_FIELDS:
        if not isinstance(getattr(m, field), torch.Tensor):
            raise TypeError(f"{name}.{field}: expected a tensor, got "
                            f"{type(getattr(m, field)).__name__}")
        check_dense(f"{name}.{field}", getattr(m, field))
    if m.e.dim() != 4:
        raise ValueError(f"{name}.e: expected [B, H, S, D], got shape {tuple(m.e.shape)}")
    B, H, S, D = m.e.shape
    check_tensor(f"{name}.e", m.e)           # a supported dtype, dense
    check_head_dim(f"{name}.e", D)
    for field in ("mag_prev", "mag_cur", "slot"):
        if tuple(getattr(m, field).shape) != (B, H, S):
            raise ValueError(f"{name}.{field}: shape {tuple(getattr(m, field).shape)} does not "
                             f"match e's [B, H, S] = {(B, H, S)}")
    for field in ("kept_prev", "kept_cur"):
        kept = getattr(m, field)
        if kept.dim() != 2 or kept.shape[1] != D or kept.dtype != m.e.dtype:
            raise ValueError(f"{name}.{field}: expected [N, {D}] {m.e.dtype}, got "
                             f"{tuple(kept.shape)} {kept.dtype}")
    if m.kept_prev.shape != m.kept_cur.shape:
        raise ValueError(f"{name}: kept_prev {tuple(m.kept_prev.shape)} and kept_cur "
                         f"{tuple(m.kept_cur.shape)} differ")
    for field, dtype in (("mag_prev", torch.float32), ("mag_cur", torch.float32),
                         ("slot", torch.int32), ("d_min", torch.float32),
                         ("d_max", torch.float32)):
        if getattr(m, field).dtype != dtype:
            raise TypeError(f"{name}.{field}: expected {dtype}, got {getattr(m, field).dtype}")
    for field in ("d_min", "d_max"):
        if tuple(getattr(m, field).shape) != (B, H):
            raise ValueError(f"{name}.{field}: shape {tuple(getattr(m, field).shape)} does not "
                             f"match e's [B, H] = {(B, H)}")
    for field in _TENSOR_FIELDS[1:]:
        if getattr(m, field).device != m.e.device:
            raise ValueError(f"{name}.{field}: device {getattr(m, field).device} does not match "
                             f"e's {m.e.device}")
    check_unit_interval(f"{name}.t", m.t)
    check_unit_interval(f"{name}.gamma", m.gamma)
    if m.magnitude not in MAGNITUDE_MODES:
        raise ValueError(f"{name}.magnitude: expected one of {MAGNITUDE_MODES}, got "
                         f"{m.magnitude!r}")
    if m.slot.device.type == "cpu" and m.slot.numel():
        # Slots are -1 (merged) or the rows 0..N-1 of the store, one token each, in (b, h, s)
        # order: a slot past the store would read outside it. (On CUDA these checks would
        # synchronise: they run on CPU pairs.)
        lo, hi = (int(v) for v in torch.aminmax(m.slot))
        n = m.kept_prev.shape[0]
        if lo < -1 or hi != n - 1:
            raise ValueError(f"{name}.slot: expected -1 (merged) or the rows 0..{n - 1} of the "
                             f"retained store, got values from {lo} to {hi}")
        kept = m.slot[m.slot >= 0]
        if kept.numel() != n or not torch.equal(kept, torch.arange(n, dtype=kept.dtype)):
            raise ValueError(f"{name}.slot: expected each row 0..{n - 1} of the retained store "
                             f"once, in (b, h, s) order; got {kept.numel()} retained tokens "
                             f"with slots {kept.tolist()[:8]}{' ...' if kept.numel() > 8 else ''}")
    return m


def resolve_neg(m: MergedPair) -> MergedPair:
    """m, or a copy whose tensors with torch's lazy negation bit (e.g. `z.conj().imag`) hold
    their values: the kernels read raw storage, which for such a view is the negated value."""
    if not any(getattr(m, name).is_neg() for name in _TENSOR_FIELDS):
        return m
    return replace(m, **{name: getattr(m, name).resolve_neg() for name in _TENSOR_FIELDS})


def _layer_parts(m: MergedPair, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitudes `[B, H, S]`, retained originals `[N, D]`) of layer "prev" or "cur"."""
    return (m.mag_prev, m.kept_prev) if layer == "prev" else (m.mag_cur, m.kept_cur)


def _slots_from_mask(retained: torch.Tensor) -> torch.Tensor:
    """int32 `[B, H, S]`: the row of each retained token in a (b, h, s)-ordered store, else -1."""
    flat = retained.reshape(-1)
    rows = torch.cumsum(flat.to(torch.int32), 0, dtype=torch.int32) - 1
    return torch.where(flat, rows, torch.full_like(rows, -1)).reshape(retained.shape)
