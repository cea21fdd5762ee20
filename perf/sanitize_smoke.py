"""A few small launches of every Triton kernel, for compute-sanitizer on a GPU machine:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python perf/sanitize_smoke.py

Shapes are odd on purpose (S and D not powers of two, strided inputs, ragged lengths, a tail)
so that every masked edge of a block is exercised. Each result is compared with the torch path
loosely (the test suite checks accuracy; this catches garbage from a bad access). Exits 1 on a
mismatch, 2 without CUDA. `python perf/sanitize_smoke.py cpu`, with TRITON_INTERPRET=1 and
MINITRITON_BACKEND=triton, runs the same launches through Triton's interpreter instead.
Without the caching allocator (the variable above) an access past a
tensor's end lands outside any allocation, where memcheck sees it.
"""

from __future__ import annotations

import os
import sys

import torch


def _layers(B, H, S, D, dtype, gen):
    # Allocated as [B, S, H, D] and viewed as [B, H, S, D]: strided, as transformers' caches.
    def draw():
        return torch.randn((B, S, H, D), generator=gen, device=gen.device,
                           dtype=dtype).transpose(1, 2)
    x_prev = draw()
    return x_prev, 0.6 * x_prev + 0.8 * draw()


def _close(name, got, want, failures):
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 1.0
    ok = bool(torch.isfinite(got).all()) and err <= 0.05 * max(scale, 1.0)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {err:.3g} (scale {scale:.3g})")
    if not ok:
        failures.append(name)


def _torch_path(fn, *args, **kwargs):
    old = os.environ.get("MINITRITON_BACKEND")
    os.environ["MINITRITON_BACKEND"] = "torch"
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            os.environ.pop("MINITRITON_BACKEND")
        else:
            os.environ["MINITRITON_BACKEND"] = old


def main(argv: list[str]) -> int:
    device = torch.device(argv[0] if argv else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_smoke: no CUDA device", file=sys.stderr)
        return 2
    import minitriton as mt

    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    failures: list[str] = []
    for dtype in (torch.bfloat16, torch.float32):
        B, H, S, D, G, T = 2, 3, 77, 96, 2, 5
        tag = str(dtype).removeprefix("torch.")
        k_prev, k_cur = _layers(B, H, S, D, dtype, gen)
        v_prev, v_cur = _layers(B, H, S, D, dtype, gen)
        km = mt.merge(k_prev, k_cur, 0.6, 0.2)
        vm = mt.merge(v_prev, v_cur, 0.6, 0.2)
        km_ref = _torch_path(mt.merge, k_prev, k_cur, 0.6, 0.2)
        _close(f"merge e {tag}", km.e, km_ref.e, failures)
        for got, want, layer in zip(mt.restore(km), mt.restore(km_ref), ("prev", "cur")):
            _close(f"restore {layer} {tag}", got, want, failures)
        q = torch.randn((B, G * H, D), generator=gen, device=device, dtype=dtype)
        k_tail, v_tail = _layers(B, H, T, D, dtype, gen)
        seq_lens = torch.tensor([S, S // 2], dtype=torch.int32, device=device)
        tail_lens = torch.tensor([T, 1], dtype=torch.int32, device=device)
        kwargs = dict(layer="cur", k_tail=k_tail, v_tail=v_tail, seq_lens=seq_lens,
                      tail_lens=tail_lens)
        o = mt.decode_attention(q, km, vm, **kwargs)
        o_ref = _torch_path(mt.decode_attention, q, km, vm, **kwargs)
        _close(f"decode_attention {tag}", o, o_ref, failures)
        if device.type == "cuda":
            torch.cuda.synchronize()
    # Retention over several 1024-token tiles, with padding and kept tokens (the extremes, mark
    # and number kernels); the kept sets may differ only at the threshold.
    B, H, S, D = 2, 3, 2100, 64
    x_prev, x_cur = _layers(B, H, S, D, torch.float32, gen)
    mask = torch.ones((B, S), dtype=torch.bool, device=device)
    mask[1, :700] = False
    keep = torch.zeros((B, S), dtype=torch.bool, device=device)
    keep[1, 700:703] = True
    m = mt.merge(x_prev, x_cur, 0.6, 0.2, mask=mask, keep=keep)
    m_ref = _torch_path(mt.merge, x_prev, x_cur, 0.6, 0.2, mask=mask, keep=keep)
    _close("merge e, padded, 3 tiles", m.e, m_ref.e, failures)
    differ = int((m.retained != m_ref.retained).sum())
    ok = differ <= max(1, m_ref.num_retained // 100) and bool(m.retained[1, :, 700:703].all())
    print(f"{'ok  ' if ok else 'FAIL'} retained, padded, 3 tiles: {m.num_retained} against "
          f"{m_ref.num_retained}, {differ} differ")
    if not ok:
        failures.append("retained, padded")
    if not differ:   # (a token kept on one side only restores differently)
        _close("restore cur, padded, 3 tiles", mt.restore(m, "cur"), mt.restore(m_ref, "cur"),
               failures)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if failures:
        print(f"sanitize_smoke: {len(failures)} mismatches: {', '.join(failures)}")
        return 1
    print("sanitize_smoke: all launches finished and match the torch path")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
