"""Restore: materialise both layers of a merged pair (the dense baseline, and for users who
want their tensors back).

    x_prev_hat = mag_prev * e,  x_cur_hat = mag_cur * e,  retained tokens = their originals

One program per BLOCK_S tokens of one (b, h) row: e is read once and both outputs are written
once; the retained store is read only for the retained rows (masked gather by slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..pair import MergedPair
from .common import (batch_chunks, block_d, out_max, saturate, tile_pruner,
                     token_tile_autotune, token_tile_configs)


# At most 16 elements of a [BLOCK_S, BLOCK_D] tile per thread (32 spill at D = 256).
_prune = tile_pruner(16)


@triton.jit(do_not_specialize=["S"])
def _restore_kernel(
    e_ptr, magp_ptr, magc_ptr, slot_ptr, kp_ptr, kc_ptr, op_ptr, oc_ptr,
    H, S, D,
    se_b, se_h, se_s, se_d,
    so_b, so_h, so_s, so_d,
    WRITE_PREV: tl.constexpr, WRITE_CUR: tl.constexpr, OUT_MAX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (S tiles, H, B): axis x takes up to 2^31 - 1 tiles, y and z up to 65535 (the
    # launcher splits a larger batch); no integer division.
    i_s = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)                              # [BLOCK_S]
    o_d = tl.arange(0, BLOCK_D)                                              # [BLOCK_D]
    o_d64 = o_d.to(tl.int64)  # (D offsets times a stride may pass 2^31)
    m_s = o_s < S
    m_sd = m_s[:, None] & (o_d[None, :] < D)
    o_tok = i_bh * S + o_s

    p_e = e_ptr + i_b * se_b + i_h * se_h + o_s[:, None] * se_s + o_d64[None, :] * se_d
    b_e = tl.load(p_e, mask=m_sd, other=0.0)
    b_e = b_e.to(tl.float32)                                                 # [BLOCK_S, BLOCK_D]
    slot = tl.load(slot_ptr + o_tok, mask=m_s, other=-1).to(tl.int64)
    kept = slot >= 0
    m_kd = m_sd & kept[:, None]
    p_k = o_d[None, :] + tl.where(kept, slot, 0)[:, None] * D
    p_o = i_b * so_b + i_h * so_h + o_s[:, None] * so_s + o_d64[None, :] * so_d
    out_ty = op_ptr.dtype.element_ty
    # Originals stay in their dtype (no float32 round trip): bit-exact by construction. A
    # restored value beyond a half dtype's range (|x| above its largest number) saturates.
    if WRITE_PREV:
        mag_p = tl.load(magp_ptr + o_tok, mask=m_s, other=0.0)
        b_kp = tl.load(kp_ptr + p_k, mask=m_kd, other=0.0)
        b_op = tl.where(kept[:, None], b_kp, saturate(mag_p[:, None] * b_e, OUT_MAX).to(out_ty))
        tl.store(op_ptr + p_o, b_op, mask=m_sd)
    if WRITE_CUR:
        mag_c = tl.load(magc_ptr + o_tok, mask=m_s, other=0.0)
        b_kc = tl.load(kc_ptr + p_k, mask=m_kd, other=0.0)
        b_oc = tl.where(kept[:, None], b_kc, saturate(mag_c[:, None] * b_e, OUT_MAX).to(out_ty))
        tl.store(oc_ptr + p_o, b_oc, mask=m_sd)


_restore_autotuned = token_tile_autotune(_restore_kernel, _prune)


def restore_triton(m: MergedPair, layer=None):
    """Launch the restore kernel. `m` is validated by `minitriton.restore`; `layer` None gives
    both layers, "prev" or "cur" one (the other is neither read nor written).

    e (the large tensor) is read through its strides; the per-token scalars and the retained
    store are small and read as contiguous (a `merge` output always is; a hand-built pair with
    strided scalars gets a contiguous copy of those only)."""
    B, H, S, D = m.shape
    want_p, want_c = layer in (None, "prev"), layer in (None, "cur")
    out_p = torch.empty((B, H, S, D), dtype=m.dtype, device=m.device) if want_p else None
    out_c = torch.empty((B, H, S, D), dtype=m.dtype, device=m.device) if want_c else None
    any_out = out_p if want_p else out_c
    small = [x.contiguous() for x in (m.mag_prev, m.mag_cur, m.slot, m.kept_prev, m.kept_cur)]
    if any_out.numel():
        mag_p, mag_c, slot, kept_p, kept_c = small
        o_p, o_c = (out_p if want_p else any_out), (out_c if want_c else any_out)
        for b in batch_chunks(B, H):
            grid = lambda meta, nb=b.stop - b.start: (  # noqa: E731
                triton.cdiv(S, meta["BLOCK_S"]), H, nb)
            # Slots index the whole store: it is passed whole, the per-token tensors sliced.
            _restore_autotuned[grid](
                m.e[b], mag_p[b], mag_c[b], slot[b], kept_p, kept_c, o_p[b], o_c[b],
                H, S, D, *m.e.stride(), *any_out.stride(), WRITE_PREV=want_p,
                WRITE_CUR=want_c, OUT_MAX=out_max(m.dtype), BLOCK_D=block_d(D))
    if layer is None:
        return out_p, out_c
    return out_p if want_p else out_c


def aot_specs() -> list:
    """Every pruned config at every BLOCK_D in 16..256 for bfloat16 and float32 writing both
    layers, float16 at BLOCK_D = 128, and the one-layer variants at BLOCK_D = 128 (D itself is
    a runtime argument; see kernels/merge.py)."""
    specs = []
    plan = [(dt, bd, True, True) for dt in ("bf16", "fp32") for bd in (16, 32, 64, 128, 256)]
    plan += [("fp16", 128, True, True), ("bf16", 128, True, False), ("bf16", 128, False, True)]
    for dt, bd, wp, wc in plan:
        sig = {"e_ptr": f"*{dt}", "magp_ptr": "*fp32", "magc_ptr": "*fp32",
               "slot_ptr": "*i32", "kp_ptr": f"*{dt}", "kc_ptr": f"*{dt}",
               "op_ptr": f"*{dt}", "oc_ptr": f"*{dt}", "H": "i32", "S": "i32", "D": "i32",
               "se_b": "i64", "se_h": "i64", "se_s": "i64", "se_d": "i64",
               "so_b": "i64", "so_h": "i64", "so_s": "i64", "so_d": "i64",
               "WRITE_PREV": "constexpr", "WRITE_CUR": "constexpr", "OUT_MAX": "constexpr",
               "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
        for cfg in _prune(token_tile_configs(), {}, BLOCK_D=bd):
            bs = cfg.kwargs["BLOCK_S"]
            specs.append((f"restore[{dt},BD={bd},out={int(wp)}{int(wc)},BS={bs},"
                           f"w={cfg.num_warps}]", _restore_kernel, sig,
                          {"WRITE_PREV": wp, "WRITE_CUR": wc, "OUT_MAX": out_max(dt),
                           "BLOCK_S": bs, "BLOCK_D": bd},
                          cfg.num_warps, cfg.num_stages))
    return specs
