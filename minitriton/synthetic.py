"""A synthetic cache for a quick look without a model: `python -m minitriton synthetic`.

Two adjacent layers' key states `[B, H, S, D]` whose directions are correlated token by token
(cosine `corr` on average), with a few outlier tokens whose two layers disagree (the pairs the
retention rule should keep), and per-token magnitudes that vary like real keys' do.
"""

from __future__ import annotations

import time

import torch


def synthetic_cache(B=2, H=8, S=2048, D=128, dtype=torch.float16, corr=0.85, outliers=0.02,
                    device="cpu", seed=0):
    """(x_prev, x_cur), each `[B, H, S, D]` in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, H, S, D, generator=g)
    noise = torch.randn(B, H, S, D, generator=g)
    x_prev = base
    x_cur = corr * base + (1 - corr ** 2) ** 0.5 * noise
    flip = torch.rand(B, H, S, generator=g) < outliers
    x_cur = torch.where(flip[..., None], torch.randn(B, H, S, D, generator=g) - base, x_cur)
    scale_p = torch.exp(0.3 * torch.randn(B, H, S, 1, generator=g))
    scale_c = scale_p * torch.exp(0.1 * torch.randn(B, H, S, 1, generator=g))
    return (x_prev * scale_p).to(dtype).to(device), (x_cur * scale_c).to(dtype).to(device)


REPEATS = 5   # timed merges per magnitude mode (after one warm-up call)


def run(B=2, H=8, S=2048, D=128, dtype=torch.float16, t=0.6, gamma=0.05, device=None) -> dict:
    """Merge a synthetic cache with both magnitude modes and print what it costs and keeps."""
    import minitriton

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x_prev, x_cur = synthetic_cache(B, H, S, D, dtype, device=device)
    print(f"synthetic cache: 2 layers x [{B}, {H}, {S}, {D}] {str(dtype).replace('torch.', '')} "
          f"on {device}; t={t}, gamma={gamma}")
    print(f"{'magnitude':<11s} {'compression':>11s} {'retained':>9s} {'rel. error prev':>16s} "
          f"{'rel. error cur':>15s} {'merge ms':>9s}")
    results = {}
    for magnitude in ("norm", "projection"):
        merge = (lambda: minitriton.merge(x_prev, x_cur, t=t, gamma=gamma, magnitude=magnitude))
        merge()   # warm-up: compilation and autotuning on a GPU, allocator and threads on a CPU
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            m = merge()
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = sorted(times)[len(times) // 2]
        xp_hat, xc_hat = minitriton.restore(m)
        errs = [(torch.linalg.vector_norm((h.float() - x.float()), dim=-1)
                 / torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(1e-12)).mean().item()
                for h, x in ((xp_hat, x_prev), (xc_hat, x_cur))]
        frac = m.retained.float().mean().item()
        print(f"{magnitude:<11s} {m.compression_ratio:10.2f}x {frac:9.1%} {errs[0]:16.4f} "
              f"{errs[1]:15.4f} {ms:9.1f}")
        results[magnitude] = dict(compression=m.compression_ratio, retained=frac,
                                  rel_error_prev=errs[0], rel_error_cur=errs[1])
    print(f"rel. error: mean over tokens of |x_hat - x| / |x| (0 for retained tokens); merge "
          f"ms: the median of {REPEATS} calls after a warm-up one")
    return results


if __name__ == "__main__":
    run()
