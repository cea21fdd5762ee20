"""Decode attention over a merged layer pair in plain torch (the CPU path).

Same contract as the Triton kernels (`minitriton.kernels.decode`), and fused in the same sense:
the restored cache `[B, H, S, D]` is never built. With mag the chosen layer's magnitudes,

    scores = mag * (q . e) * sm_scale                  one batched matmul over e
    o      = (p * mag_v) @ e_v                         one batched matmul over e_v

and the few retained tokens are fixed up afterwards from their rows of the retained store:
their scores are recomputed as q . kept, and their value terms replaced by p * kept. Which
(b, h, s) a store row belongs to is found with a scatter rather than `nonzero` off a CPU, so
this path does not synchronise with the host either (it matters when it runs on CUDA tensors).
All arithmetic in float32. A half-precision e is upcast for the matmuls, on a CPU chunk by
chunk along S (`minitriton._upcast`).
"""

from __future__ import annotations

import torch

from ._upcast import upcast_chunks
from .pair import MergedPair, _layer_parts
from .torch_merge import saturate


def _retained_index(slot: torch.Tensor, num_kept: int,
                    sync_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bh, s) int64 [N] of each retained-store row, from slot [B, H, S] (rows in (b, h, s) order).

    sync_free: with a scatter (row r sits where slot == r; the other tokens go to a spare last
    entry) rather than `nonzero`, which reads its count on the host: for CUDA tensors. On a
    CPU `nonzero` is cheaper.
    """
    S = slot.shape[-1]
    flat = slot.reshape(-1)
    if not sync_free:
        pos = torch.nonzero(flat >= 0).view(-1)
    else:
        target = torch.where(flat >= 0, flat.long(), num_kept)
        pos = torch.empty(num_kept + 1, dtype=torch.long, device=slot.device)
        pos.scatter_(0, target, torch.arange(flat.numel(), device=slot.device))
        pos = pos[:num_kept]
    return pos // S, pos % S


def _weighted_rows(w: torch.Tensor, e: torch.Tensor, unused=None) -> torch.Tensor:
    """w @ e, float32 `[B, H, G, D]` (w `[B, H, G, S]`, e `[B, H, S, D]`), with the rows of e
    marked `unused` (bool `[B, H, S]`, whose weights are 0) read as 0: a copy of e, which a
    CPU makes only when the plain product is not finite."""
    o = None
    for sl, e32 in upcast_chunks(e):
        if unused is not None:
            e32 = e32.masked_fill(unused[:, :, sl, None], 0.0)
        part = torch.matmul(w[..., sl], e32)
        o = part if o is None else o.add_(part)
    return o


def decode_attention_torch(q: torch.Tensor, k: MergedPair, v: MergedPair, layer: str,
                           k_tail, v_tail, seq_lens, tail_lens, sm_scale: float,
                           seq_starts=None):
    """(o [B, Hq, D] in q.dtype, lse [B, Hq] float32). Arguments are validated by the caller."""
    B, Hq, D = q.shape
    _, H, S, _ = k.shape
    G = Hq // H
    f32 = torch.float32
    dev = q.device
    qg = q.reshape(B, H, G, D).to(f32) * sm_scale                            # [B, H, G, D]
    # Merged tokens outside [seq_starts, seq_lens) of their row: bool [B, 1, S], or None.
    dead = None
    if seq_lens is not None:
        dead = torch.arange(S, device=dev) >= seq_lens.view(B, 1, 1)
    if seq_starts is not None:
        before = torch.arange(S, device=dev) < seq_starts.view(B, 1, 1)
        dead = before if dead is None else dead | before

    # Scores of merged tokens: mag_j (q . e_j), then the retained ones from their originals.
    mag_k, kept_k = _layer_parts(k, layer)
    parts = [torch.matmul(qg, e32.transpose(-1, -2)) for _, e32 in upcast_chunks(k.e)]
    s = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)           # [B, H, G, S]
    s.mul_(mag_k.unsqueeze(2))
    if kept_k.shape[0]:
        bh, pos = _retained_index(k.slot, kept_k.shape[0], dev.type != "cpu")
        q_rows = qg.reshape(B * H, G, D)[bh]                                 # [N, G, D]
        s.view(B * H, G, S)[bh, :, pos] = torch.einsum("ngd,nd->ng", q_rows, kept_k.to(f32))
    if dead is not None:
        s.masked_fill_(dead.unsqueeze(2), float("-inf"))

    has_tail = k_tail is not None and k_tail.shape[2] > 0
    if has_tail:
        T = k_tail.shape[2]
        st = torch.matmul(qg, k_tail.to(f32).transpose(-1, -2))             # [B, H, G, T]
        if tail_lens is not None:
            st.masked_fill_(torch.arange(T, device=dev) >= tail_lens.view(B, 1, 1, 1),
                            float("-inf"))
        m = torch.maximum(s.amax(-1), st.amax(-1)) if S else st.amax(-1)     # [B, H, G]
    else:
        m = s.amax(-1) if S else torch.full((B, H, G), float("-inf"), dtype=f32, device=dev)
    # A row with no token keeps m = -inf: shift by 0 so that exp gives 0 rather than NaN.
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)

    p = s.sub_(m.unsqueeze(-1)).exp_()                                       # [B, H, G, S]
    den = p.sum(-1)

    # Values: (p * mag_v) @ e_v, with the retained tokens' terms swapped for p * kept. Rows
    # outside the lengths, and retained rows' e, are never used but may hold anything (a NaN in
    # a preallocated buffer): their weight is 0, and 0 * NaN would be NaN.
    mag_v, kept_v = _layer_parts(v, layer)
    unused = dead                                                            # [B, 1 or H, S]
    if dead is not None:
        mag_v = mag_v.masked_fill(dead, 0.0)
    pm = p * mag_v.unsqueeze(2)
    if kept_v.shape[0]:
        bh_v, pos_v = _retained_index(v.slot, kept_v.shape[0], dev.type != "cpu")
        p_ret = p.view(B * H, G, S)[bh_v, :, pos_v]                          # [N, G]
        pm.view(B * H, G, S)[bh_v, :, pos_v] = 0.0
        unused = v.slot >= 0 if unused is None else unused | (v.slot >= 0)
    o = _weighted_rows(pm, v.e, None if dev.type == "cpu" else unused)
    if unused is not None and dev.type == "cpu" and not bool(torch.isfinite(o).all()):
        o = _weighted_rows(pm, v.e, unused)   # (no host synchronisation to ask, on a CPU)
    # The retained originals outside the lengths, likewise, are zeroed.
    if kept_v.shape[0]:
        kv = kept_v.to(f32)
        if dead is not None:
            kv = kv.masked_fill(dead[bh_v // H, 0, pos_v].unsqueeze(-1), 0.0)
        o.view(B * H, G, D).index_add_(0, bh_v, p_ret.unsqueeze(-1) * kv.unsqueeze(1))
    if has_tail:
        pt = st.sub_(m.unsqueeze(-1)).exp_()
        den = den + pt.sum(-1)
        vt = v_tail.to(f32)
        if tail_lens is not None:
            live = torch.arange(T, device=dev) < tail_lens.view(B, 1, 1)     # [B, 1, T]
            vt = vt.masked_fill(~live.unsqueeze(-1), 0.0)
        o = o + torch.matmul(pt, vt)

    # A row that saw no token at all: o = 0, lse = -inf (log 0). (A NaN score makes den NaN:
    # o and lse are then NaN, as in attention over the dense layer.)
    o = torch.where(den.unsqueeze(-1) != 0, o / den.clamp_min(torch.finfo(f32).tiny).unsqueeze(-1),
                    torch.zeros_like(o))
    lse = m + torch.log(den)
    return saturate(o.reshape(B, Hq, D), q.dtype).to(q.dtype), lse.reshape(B, Hq)
