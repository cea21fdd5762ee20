"""Flash-decoding over a merged layer pair: split-K partial softmax + log-sum-exp reduce.

One query token per sequence attends over one layer of a MiniCache `MergedPair` (keys `k`,
values `v`), then over an uncompressed tail, without writing the restored cache anywhere:

    k_j = kept[slot_j]           if token j was retained (slot_j >= 0)
          mag_j * e_j            otherwise                (mag = mag_prev or mag_cur)
    s_j = (q . k_j) * sm_scale,   o = sum_j softmax(s)_j v_j   (v_j built the same way)

The restored rows exist only as register tiles. Each cache byte (e, mag, slot, the retained
rows actually used) is loaded once per KV head: the G = Hq / H query heads of a KV head share
a program (padded to BLOCK_G >= 16 rows so that tl.dot applies).

Split-K: the token axis (merged tokens, then the tail, as one virtual sequence) is cut into
`num_splits` chunks of `chunk` tokens; program (kv head, split) writes an unnormalised partial
(acc [D], running max m, sum l) into a float32 workspace, and
`_decode_reduce_kernel` combines the partials of each query head with log-sum-exp.

Everything runs in float32: tiles are upcast right after tl.load and the dots use
input_precision="ieee" on float32 operands (decode is memory-bound, and a bf16/fp16 tl.dot is
wrong in Triton's interpreter, so this is also the path that the CPU tests exercise).
No host synchronisation: lengths stay on the device, all buffers are allocated before the
launches, so the launcher can be captured in a CUDA graph (once each kernel variant it
launches has been compiled, by the same call outside the capture).
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ..backend import interpreter_enabled
from ..pair import _layer_parts
from .common import block_d, out_max, saturate, torch_to_tl_dtype, version

# Without a GPU (interpreter, ahead-of-time builds) there is no multiprocessor count: use an
# H100/H200's 132 so that the split heuristic behaves as it would there.
NOMINAL_NUM_SMS = 132
# The reduce kernel walks the splits in chunks of this many.
REDUCE_BLOCK_S = 16
# Upper bound for num_splits: partials take B * Hq * num_splits * (D + 2) * 4 bytes.
MAX_SPLITS = 1024
# A split should stream at least this many tokens, else its partial costs more than it saves.
MIN_TOKENS_PER_SPLIT = 256
# Float32 FMA dots: exact float32 on a GPU, and what the interpreter computes too ("tf32" would
# differ between the two; decode is memory-bound, so tensor cores would buy little).
DOT_PRECISION = tl.constexpr("ieee")
BLOCK_G = 16  # query rows per program: tl.dot needs M >= 16; G > 16 takes several programs
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ---- kernels ---------------------------------------------------------------------------------
@triton.jit
def _merged_tile(E, MAG, SLOT, KEPT, o_n, m_n, o_d, m_d,
                 stride_es, stride_ed, stride_ms, stride_kn, stride_kd):
    """[BLOCK_N, BLOCK_D] float32 restored rows of one block of merged tokens (0 where masked).

    E, MAG, SLOT point at this (b, h) row; KEPT at the retained store of the chosen layer.
    o_d: offsets along D (int64 with WIDE_D, see the split kernel).
    """
    slot = tl.load(SLOT + o_n * stride_ms, mask=m_n, other=-1)                 # [BLOCK_N]
    mag = tl.load(MAG + o_n * stride_ms, mask=m_n, other=0.0).to(tl.float32)   # [BLOCK_N]
    ret = slot >= 0
    # A retained token's direction is never used: skip its bytes.
    m_e = (m_n & (slot < 0))[:, None] & m_d[None, :]
    e = tl.load(E + o_n[:, None] * stride_es + o_d[None, :] * stride_ed, mask=m_e,
                other=0.0).to(tl.float32)                                    # [BLOCK_N, BLOCK_D]
    # Gather the few retained rows; int64 because N * D can exceed 2**31 for a long cache.
    row = tl.where(ret, slot, 0).to(tl.int64)
    kept = tl.load(KEPT + row[:, None] * stride_kn + o_d[None, :] * stride_kd,
                   mask=ret[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    return tl.where(ret[:, None], kept, e * mag[:, None])


@triton.jit
def _scores(q, k, m_n):
    """[BLOCK_G, BLOCK_N] scores of one block (q holds sm_scale), -inf where masked."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return tl.where(m_n[None, :], s, float("-inf"))


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc):
    """Fold one block's scores s and values v into the running (max, sum, weighted values).

    exp(s - m) as exp2((s - m) log2(e)): the scale to base 2 applies to differences, which are
    <= 0, so that it cannot overflow (scaling q or the scores by log2(e) would, past 2.4e38)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))                               # [BLOCK_G]
    # Rows that have seen no token yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2((m_i - m_safe) * _LOG2E)                            # [BLOCK_G]
    p = tl.math.exp2((s - m_safe[:, None]) * _LOG2E)                         # [BLOCK_G, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_D]
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["S", "T", "chunk", "G", "NUM_GB"])
def _decode_split_kernel(
    Q, EK, MAGK, SLOTK, KEPTK, EV, MAGV, SLOTV, KEPTV, KT, VT, SEQ_LENS, TAIL_LENS, SEQ_STARTS,
    WS,
    sm_scale, S, T, chunk, G, H, NUM_GB, D,
    stride_qb, stride_qh, stride_qd,
    stride_ekb, stride_ekh, stride_eks, stride_ekd,
    stride_mkb, stride_mkh, stride_mks, stride_kkn, stride_kkd,
    stride_evb, stride_evh, stride_evs, stride_evd,
    stride_mvb, stride_mvh, stride_mvs, stride_kvn, stride_kvd,
    stride_ktb, stride_kth, stride_kts, stride_ktd,
    stride_vtb, stride_vth, stride_vts, stride_vtd,
    stride_wb, stride_wh, stride_ws,
    HAS_TAIL: tl.constexpr, HAS_STARTS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_D: tl.constexpr,
):
    """Program (kv head b*H+h, group block, split): partial softmax over `chunk` tokens.

    HAS_STARTS: row b's merged tokens before SEQ_STARTS[b] are skipped (left padding).

    WIDE_D: e or the retained rows have a D stride such that D offsets times it pass 2^31
    (only a hand-built view of a pair can): their offsets along D are then int64, which costs
    registers, so the usual build keeps int32 ones there."""
    i_bhg = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_gb = i_bhg % NUM_GB
    i_bh = i_bhg // NUM_GB
    i_b = i_bh // H
    i_h = i_bh % H

    o_g = i_gb * BLOCK_G + tl.arange(0, BLOCK_G)                             # [BLOCK_G]
    m_g = o_g < G
    o_hq = i_h * G + o_g                                                     # query heads
    o_d = tl.arange(0, BLOCK_D)                                              # [BLOCK_D]
    m_d = o_d < D
    o_d64 = o_d.to(tl.int64)  # (D offsets times a stride may pass 2^31)
    if WIDE_D:
        o_dt = o_d64
    else:
        o_dt = o_d
    q = tl.load(Q + i_b * stride_qb + o_hq[:, None] * stride_qh + o_d64[None, :] * stride_qd,
                mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    q = q * sm_scale

    # Lengths are clamped so that an out-of-range value can never read outside the cache.
    seq_len = tl.minimum(tl.maximum(tl.load(SEQ_LENS + i_b), 0), S)
    lo = i_s * chunk
    hi = lo + chunk

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    # With starts, the row's offsets begin at its start: its merged tokens [row_start, seq_len)
    # are positions [0, seq_len - row_start) of the virtual sequence (merged tokens, then the
    # tail), which the splits share in aligned blocks, as without starts.
    # Merged tokens [lo, min(hi, seq_len)) of this split (seq_len: from the start).
    o_ek = i_b * stride_ekb + i_h * stride_ekh
    o_mk = i_b * stride_mkb + i_h * stride_mkh
    o_ev = i_b * stride_evb + i_h * stride_evh
    o_mv = i_b * stride_mvb + i_h * stride_mvh
    if HAS_STARTS:
        row_start = tl.minimum(tl.maximum(tl.load(SEQ_STARTS + i_b), 0), S)
        seq_len = tl.maximum(seq_len - row_start, 0)
        o_ek += row_start.to(tl.int64) * stride_eks
        o_mk += row_start.to(tl.int64) * stride_mks
        o_ev += row_start.to(tl.int64) * stride_evs
        o_mv += row_start.to(tl.int64) * stride_mvs
    p_ek = EK + o_ek
    p_mk = MAGK + o_mk
    p_sk = SLOTK + o_mk
    p_ev = EV + o_ev
    p_mv = MAGV + o_mv
    p_sv = SLOTV + o_mv
    end = tl.minimum(hi, seq_len)
    for start in range(lo, end, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)                                  # [BLOCK_N]
        m_n = o_n < end
        k = _merged_tile(p_ek, p_mk, p_sk, KEPTK, o_n, m_n, o_dt, m_d,
                         stride_eks, stride_ekd, stride_mks, stride_kkn, stride_kkd)
        s = _scores(q, k, m_n)
        # V after the scores: the K and V tiles are then never live together (registers).
        v = _merged_tile(p_ev, p_mv, p_sv, KEPTV, o_n, m_n, o_dt, m_d,
                         stride_evs, stride_evd, stride_mvs, stride_kvn, stride_kvd)
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc)

    if HAS_TAIL:
        # The tail continues the virtual sequence at position seq_len.
        tail_len = tl.minimum(tl.maximum(tl.load(TAIL_LENS + i_b), 0), T)
        t_lo = tl.maximum(lo, seq_len) - seq_len
        t_hi = tl.minimum(hi, seq_len + tail_len) - seq_len
        p_kt = KT + i_b * stride_ktb + i_h * stride_kth
        p_vt = VT + i_b * stride_vtb + i_h * stride_vth
        for start in range(t_lo, t_hi, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            m_n = o_n < t_hi
            m_nd = m_n[:, None] & m_d[None, :]
            k = tl.load(p_kt + o_n[:, None] * stride_kts + o_d64[None, :] * stride_ktd,
                        mask=m_nd, other=0.0).to(tl.float32)                 # [BLOCK_N, BLOCK_D]
            s = _scores(q, k, m_n)
            v = tl.load(p_vt + o_n[:, None] * stride_vts + o_d64[None, :] * stride_vtd,
                        mask=m_nd, other=0.0).to(tl.float32)
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc)

    # Partial of this split: WS[b, hq, split, :D] = acc, [D] = m, [D + 1] = l.
    # An empty split writes acc = 0, m = -inf, l = 0, which the reduce weighs by zero.
    p_w = WS + i_b * stride_wb + o_hq * stride_wh + i_s * stride_ws          # [BLOCK_G]
    tl.store(p_w[:, None] + o_d[None, :], acc, mask=m_g[:, None] & m_d[None, :])
    tl.store(p_w + D, m_i, mask=m_g)
    tl.store(p_w + D + 1, l_i, mask=m_g)


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _decode_reduce_kernel(
    WS, O, LSE, NUM_SPLITS, HQ, D,
    stride_wb, stride_wh, stride_ws, stride_ob, stride_oh, stride_od, stride_lb, stride_lh,
    OUT_MAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, hq): o = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max m)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_w = WS + i_b * stride_wb + i_h * stride_wh

    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)                                     # [BLOCK_S]
        m_s = o_s < NUM_SPLITS
        p_s = p_w + o_s * stride_ws
        m_c = tl.load(p_s + D, mask=m_s, other=float("-inf"))
        l_c = tl.load(p_s + D + 1, mask=m_s, other=0.0)
        a_c = tl.load(p_s[:, None] + o_d[None, :], mask=m_s[:, None] & m_d[None, :],
                      other=0.0)                                             # [BLOCK_S, BLOCK_D]
        m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_run - m_safe) * _LOG2E)
        w = tl.math.exp2((m_c - m_safe) * _LOG2E)                            # [BLOCK_S]
        l_run = l_run * alpha + tl.sum(w * l_c, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a_c, axis=0)
        m_run = m_new

    # A row that saw no token at all (seq_len = tail_len = 0) gives o = 0 and lse = -inf. (A
    # NaN score makes l_run NaN: o and lse are then NaN, as in attention over the dense layer.)
    has = (l_run == 0.0) == 0
    o = tl.where(has, acc / tl.where(has, l_run, 1.0), 0.0)
    lse = tl.where(has, m_run + tl.math.log2(tl.where(has, l_run, 1.0)) * _LN2, float("-inf"))
    # (o is a weighted mean of restored values: beyond a half dtype's range it saturates)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + o_d.to(tl.int64) * stride_od,
             saturate(o, OUT_MAX).to(O.dtype.element_ty), mask=m_d)
    tl.store(LSE + i_b * stride_lb + i_h * stride_lh, lse)


# ---- configs ---------------------------------------------------------------------------------
# BLOCK_D -> (BLOCK_N, num_warps, num_stages) on a GPU. The dots run on CUDA cores (float32
# FMA), whose operand layouts hold whole rows of q and k per thread, so registers, not
# bandwidth, bound the tiles. With triton 3.9, ptxas run as Triton runs it
# (tests/aot_compile.py) compiles each entry for sm_80 and sm_90 in every dtype at 48-255
# registers, without spills but in three builds specialised for aligned inputs on sm_80
# (float32 at D = 32 with a tail, float16 at D = 256 with a tail and row starts), where ptxas
# chooses 64 registers and 8-40 bytes of spills (none when given the block's register budget).
# Not kept: D = 16 with BLOCK_N = 64 (48 bytes of spills by ptxas's choice on sm_90), 4 warps
# (up to 556 bytes of spills at D = 64 in float32), software pipelining (num_stages > 1
# doubled the registers). D = 256 depends on the compiler: BLOCK_N = 32 runs at 255 registers
# without spills from triton 3.7, but spilled 24-112 bytes with triton 3.2-3.6 on sm_80;
# BLOCK_N = 16 is the reverse (no spills with 3.2-3.6, 280-880 bytes with 3.9).
_GPU_CONFIGS = {16: (32, 8, 1), 32: (64, 8, 1), 64: (32, 8, 1), 128: (16, 8, 1),
                256: (32, 8, 1)}
_GPU_CONFIGS_BEFORE_3_7 = {256: (16, 8, 1)}
# With row starts and a tail (HAS_STARTS, HAS_TAIL), D = 256 at 8 warps takes up to 255 registers
# (one program of 8 warps per multiprocessor); 16 warps halve each thread's share of the tiles
# (128 registers, no spills): twice the warps per multiprocessor, at the same programs.
# (Without a tail, 16 warps spill kilobytes and 8 do not.)
_GPU_CONFIGS_STARTS_TAIL = {256: (32, 16, 1)}


def kernel_config(D: int, dtype: torch.dtype, starts: bool = False, tail: bool = False) -> dict:
    """BLOCK_N, num_warps, num_stages of the split kernel for head dim D and cache dtype (and
    whether rows have starts and a tail).

    Fixed heuristics rather than autotuning: the launcher needs BLOCK_N to size the splits, an
    autotuner cannot benchmark under CUDA-graph capture, and decode is memory-bound (bigger
    tiles mostly cost registers). The same tiles suit every dtype: everything is float32 after
    the load. Under the interpreter: one small config.
    """
    if interpreter_enabled():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    del dtype
    return _gpu_config(block_d(D), starts, tail)


def _gpu_config(bd: int, starts: bool = False, tail: bool = False) -> dict:
    n, w, st = _GPU_CONFIGS[bd]
    if version(triton.__version__) < (3, 7):
        n, w, st = _GPU_CONFIGS_BEFORE_3_7.get(bd, (n, w, st))
    elif starts and tail:
        n, w, st = _GPU_CONFIGS_STARTS_TAIL.get(bd, (n, w, st))
    return dict(BLOCK_N=n, num_warps=w, num_stages=st)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_NUM_SMS


def choose_num_splits(batch_programs: int, length: int, block_n: int, sms: int) -> int:
    """Splits of the token axis so that about two waves of programs fill the GPU.

    batch_programs = B * H * group blocks; length = S + T (the longest possible row, known on
    the host without a synchronisation). Batch 1 at long context gets many splits; a batch
    that already fills the GPU gets one. Each split streams at least MIN_TOKENS_PER_SPLIT.
    """
    if length <= 0:
        return 1
    want = math.ceil(2 * sms / max(batch_programs, 1))
    by_len = math.ceil(length / max(MIN_TOKENS_PER_SPLIT, block_n))
    return max(1, min(want, by_len, MAX_SPLITS))


# ---- launcher --------------------------------------------------------------------------------
def _check_interpreter_loops():
    """The split kernel loops over tokens with bounds known at run time. Triton's interpreter
    before 3.7 turns such bounds into Python ints with int() on a one-element array, which
    numpy 2.4 refuses; say so instead of failing inside the interpreter."""
    import numpy as np

    if version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        raise RuntimeError(
            f"decode_attention under Triton's interpreter needs triton >= 3.7 or numpy < 2.4 "
            f"(here triton {triton.__version__}, numpy {np.__version__}): this interpreter "
            "cannot run loops whose bounds are known at run time under numpy 2.4")


def wide_d(*xs: torch.Tensor) -> bool:
    """Whether offsets along D times the D stride of any of `xs` pass int32 (the split
    kernel's WIDE_D): never for a pair from `merge` (D stride 1)."""
    return any(x.stride(-1) * (x.shape[-1] - 1) >= 2 ** 31 for x in xs)


def decode_attention_triton(q, k, v, layer, k_tail, v_tail, seq_lens, tail_lens, sm_scale,
                            num_splits=None, *, seq_starts=None, out=None, lse=None,
                            workspace=None):
    """Launch the split and reduce kernels. Arguments are validated by the caller.

    q [B, Hq, D]; k, v MergedPair [B, H, S, D]; k_tail/v_tail [B, H, T, D] or None;
    seq_lens/tail_lens/seq_starts int32 [B] on q's device or None; sm_scale float.
    out ([B, Hq, D], q.dtype), lse ([B, Hq] float32) and workspace ([B, Hq, num_splits, D + 2]
    float32) may be given preallocated (e.g. NaN-filled by tests); every element is written.
    Returns (o, lse).
    """
    if interpreter_enabled():
        _check_interpreter_loops()
    B, Hq, D = q.shape
    _, H, S, _ = k.shape
    G = Hq // H
    T = 0 if k_tail is None else k_tail.shape[2]
    has_tail = T > 0
    num_gb = triton.cdiv(G, BLOCK_G)
    cfg = kernel_config(D, q.dtype, seq_starts is not None, has_tail)
    bd = block_d(D)
    if num_splits is None:
        num_splits = choose_num_splits(B * H * num_gb, S + T, cfg["BLOCK_N"], num_sms(q.device))
    # Chunks are whole blocks so that every merged block of a split starts aligned.
    chunk = triton.cdiv(triton.cdiv(max(S + T, 1), num_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]

    dev = q.device
    # The kernel reads lengths with stride 1: a strided [B] view is copied (B int32 values; the
    # copy is captured with the launches in a CUDA graph, so in-place updates still count).
    seq_lens = (torch.full((B,), S, dtype=torch.int32, device=dev) if seq_lens is None
                else seq_lens.contiguous())
    if has_tail:
        tail_lens = (torch.full((B,), T, dtype=torch.int32, device=dev) if tail_lens is None
                     else tail_lens.contiguous())
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty((B, Hq), dtype=torch.float32, device=dev)
    if workspace is None:
        workspace = torch.empty((B, Hq, num_splits, D + 2), dtype=torch.float32, device=dev)
    for name, x, shape, dtype in (("out", out, (B, Hq, D), q.dtype),
                                  ("lse", lse, (B, Hq), torch.float32),
                                  ("workspace", workspace, (B, Hq, num_splits, D + 2),
                                   torch.float32)):
        if tuple(x.shape) != shape or x.dtype != dtype or x.device != dev:
            raise ValueError(f"{name}: expected a {list(shape)} {dtype} tensor on {dev}, got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if workspace.stride(-1) != 1:
        raise ValueError("workspace: expected a contiguous last dim")

    mag_k, kept_k = _layer_parts(k, layer)
    mag_v, kept_v = _layer_parts(v, layer)
    # mag and slot are read with one set of strides; a MergedPair holds them contiguous.
    slot_k, slot_v = k.slot, v.slot
    if mag_k.stride() != slot_k.stride():
        mag_k, slot_k = mag_k.contiguous(), slot_k.contiguous()
    if mag_v.stride() != slot_v.stride():
        mag_v, slot_v = mag_v.contiguous(), slot_v.contiguous()
    # Without a tail, any pointer will do: HAS_TAIL=False removes every access to it.
    kt = k_tail if has_tail else q
    vt = v_tail if has_tail else q
    kt_strides = kt.stride() if has_tail else (0, 0, 0, 0)
    vt_strides = vt.stride() if has_tail else (0, 0, 0, 0)
    tl_ptr = tail_lens if has_tail else seq_lens
    has_starts = seq_starts is not None
    starts_ptr = seq_starts.contiguous() if has_starts else seq_lens

    grid = (B * H * num_gb, num_splits)
    _decode_split_kernel[grid](
        q, k.e, mag_k, slot_k, kept_k, v.e, mag_v, slot_v, kept_v, kt, vt, seq_lens, tl_ptr,
        starts_ptr, workspace,
        sm_scale, S, T, chunk, G, H, num_gb, D,
        *q.stride(),
        *k.e.stride(), *mag_k.stride(), *kept_k.stride(),
        *v.e.stride(), *mag_v.stride(), *kept_v.stride(),
        *kt_strides, *vt_strides,
        workspace.stride(0), workspace.stride(1), workspace.stride(2),
        HAS_TAIL=has_tail, HAS_STARTS=has_starts, BLOCK_G=BLOCK_G, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=bd,
        WIDE_D=wide_d(k.e, v.e, kept_k, kept_v),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _decode_reduce_kernel[(B * Hq,)](
        workspace, out, lse, num_splits, Hq, D,
        workspace.stride(0), workspace.stride(1), workspace.stride(2),
        *out.stride(), *lse.stride(),
        OUT_MAX=out_max(out.dtype), BLOCK_S=REDUCE_BLOCK_S, BLOCK_D=bd,
        num_warps=1 if interpreter_enabled() else 4, num_stages=1,   # (as compiled ahead)
    )
    return out, lse


# ---- ahead-of-time builds --------------------------------------------------------------------
def aot_specs() -> list:
    """Every kernel config, for ahead-of-time compilation without a GPU.

    Returns a list of (name, jit_fn, signature, constexprs, num_warps, num_stages), to be
    compiled with `triton.compile(ASTSource(jit_fn, signature, constexprs),
    target=GPUTarget("cuda", cc, 32), options=dict(num_warps=..., num_stages=...))`.
    The configs are those the launcher picks on a GPU: every cache dtype, every BLOCK_D
    (D in [16, 256]), with and without a tail, with and without row starts, and the WIDE_D
    build of each (named "_wideD": only hand-built views of a pair need it, and a few bytes of
    spills there are tolerated);
    the reduce kernel per dtype and BLOCK_D.
    """
    split_args = [a for a in _decode_split_kernel.arg_names]
    reduce_args = [a for a in _decode_reduce_kernel.arg_names]
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ty = torch_to_tl_dtype(dtype)
        for bd in _GPU_CONFIGS:
            for has_tail, starts, wide in itertools.product((False, True), (False, True),
                                                            (False, True)):
                cfg = _gpu_config(bd, starts, has_tail)
                sig = {}
                for a in split_args:
                    if a in ("Q", "EK", "KEPTK", "EV", "KEPTV", "KT", "VT"):
                        sig[a] = "*" + ty
                    elif a in ("MAGK", "MAGV", "WS"):
                        sig[a] = "*fp32"
                    elif a in ("SLOTK", "SLOTV", "SEQ_LENS", "TAIL_LENS", "SEQ_STARTS"):
                        sig[a] = "*i32"
                    elif a == "sm_scale":
                        sig[a] = "fp32"
                    elif a in ("HAS_TAIL", "HAS_STARTS", "BLOCK_G", "BLOCK_N", "BLOCK_D",
                               "WIDE_D"):
                        sig[a] = "constexpr"
                    else:
                        sig[a] = "i32"
                consts = dict(HAS_TAIL=has_tail, HAS_STARTS=starts, BLOCK_G=BLOCK_G,
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, WIDE_D=wide)
                name = (f"decode_split_{ty}_d{bd}_n{cfg['BLOCK_N']}" + ("_tail" if has_tail else "")
                        + ("_starts" if starts else "") + ("_wideD" if wide else ""))
                specs.append((name, _decode_split_kernel, sig, consts, cfg["num_warps"],
                              cfg["num_stages"]))
            sig = {}
            for a in reduce_args:
                if a in ("WS", "LSE"):
                    sig[a] = "*fp32"
                elif a == "O":
                    sig[a] = "*" + ty
                elif a in ("OUT_MAX", "BLOCK_S", "BLOCK_D"):
                    sig[a] = "constexpr"
                else:
                    sig[a] = "i32"
            specs.append((f"decode_reduce_{ty}_d{bd}", _decode_reduce_kernel, sig,
                          dict(OUT_MAX=out_max(dtype), BLOCK_S=REDUCE_BLOCK_S, BLOCK_D=bd),
                          4, 1))
    return specs
