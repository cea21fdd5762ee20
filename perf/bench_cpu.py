"""CPU figures of the torch path, each against the baseline it is held to (not a timed test):

    (a) merge of two [4, 8, 4096, 128] float32 layers against one torch.add of the same two
        inputs: target <= 2x the add's time (goal 1.5x)
    (b) decode_attention at B=4, Hq=32, H=8, S=4096, D=128 float32 against restore + SDPA over
        the restored layer: target <= 0.8x its time (goal 0.6x)

    python perf/bench_cpu.py [--out DIR] [--threads N] [--profile]

Both run in one process: after a warm-up, the op and its baselines are called in turn,
ROUNDS times, and each one's median is reported; the verdict is on the ratio of the medians,
and the median of the per-round ratios is reported beside it. Results are printed and written
as bench_cpu.md and bench_cpu.json (bench_cpu-tN.* with --threads N) into DIR (default
perf/results/cpu/). --profile adds the torch profiler's table of the torch ops that dominate
each op and baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.cases import Point, build  # noqa: E402
from perf.timing import (REPO_ROOT, environment, positive_int, summarize,  # noqa: E402
                         writable_dir)

ROUNDS = 25
CHECKS = (
    # name, point, baseline provider, target ratio, goal ratio (op time / baseline time)
    ("merge vs torch.add", Point("merge", torch.float32, 4, 8, 4096, 128), "add", 2.0, 1.5),
    ("decode vs restore + sdpa", Point("decode", torch.float32, 4, 8, 4096, 128, Hq=32),
     "restore+sdpa", 0.8, 0.6),
)


def _time_interleaved(fns: dict, rounds: int = ROUNDS) -> dict:
    """Per-round times (ms) of each callable, timed in alternation (one call of each per round)
    so that load from other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():  # warm-up: allocator, thread pool, caches
        fn()
        fn()
    samples = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return samples


def _profile(fn, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_check(name, point, baseline, target, goal, profile_ops: bool) -> dict:
    device = torch.device("cpu")
    case = build(point, device)
    fns = {p.name: p.make() for p in case.providers}
    if baseline == "add":
        # The same two inputs the merge reads, through one elementwise op.
        x_prev, x_cur = case.inputs
        fns["add"] = lambda: torch.add(x_prev, x_cur)
    samples = _time_interleaved(fns)
    timings = {n: summarize(xs) for n, xs in samples.items()}
    ratio = timings["op"].median_ms / timings[baseline].median_ms
    # The median of the per-round ratios: the two calls of a round run under the same load,
    # so this one moves less than the ratio of medians when the load drifts (reported beside
    # it; the verdict stays on the ratio of medians).
    paired = summarize([o / b for o, b in zip(samples["op"], samples[baseline])])
    verdict = "GOAL" if ratio <= goal else "PASS" if ratio <= target else "MISS"
    result = {
        "name": name, "point": f"{point.dtype_name} {point.label}", "baseline": baseline,
        "ratio": ratio,
        "paired_ratio": {"median": paired.median_ms, "p20": paired.p20_ms, "p80": paired.p80_ms},
        "target": target, "goal": goal, "verdict": verdict,
        "ms": {n: {"median": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms}
               for n, t in timings.items()},
    }
    if profile_ops:
        result["profile"] = {n: _profile(fns[n]) for n in ("op", baseline)}
    return result


def markdown(results: list[dict], env: dict) -> str:
    out = ["# minitriton: CPU figures of the torch path", ""]
    out += [f"- {k}: {v}" for k, v in env.items()] + [""]
    out += ["| check | point | op ms (p20-p80) | baseline ms (p20-p80) | op / baseline "
            "| per-round op / baseline, median (p20-p80) | target | goal | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        op, base, pr = r["ms"]["op"], r["ms"][r["baseline"]], r["paired_ratio"]
        out.append(
            f"| {r['name']} | {r['point']} | {op['median']:.2f} ({op['p20']:.2f}-{op['p80']:.2f}) "
            f"| {base['median']:.2f} ({base['p20']:.2f}-{base['p80']:.2f}) | {r['ratio']:.2f}x "
            f"| {pr['median']:.2f}x ({pr['p20']:.2f}-{pr['p80']:.2f}) | <= {r['target']}x "
            f"| <= {r['goal']}x | {r['verdict']} |")
    out += ["", "Other measurements at the same points (median ms):", ""]
    for r in results:
        others = ", ".join(f"{n} {t['median']:.2f}" for n, t in r["ms"].items()
                           if n not in ("op", r["baseline"]))
        out.append(f"- {r['name']}: {others}")
    for r in results:
        for n, table in r.get("profile", {}).items():
            out += ["", f"## profile: {r['name']}, {n}", "", "```", table, "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "cpu")
    ap.add_argument("--profile", action="store_true",
                    help="add the torch profiler's table of each op and baseline")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch CPU threads (default: torch's default)")
    args = ap.parse_args(argv)
    writable_dir(ap, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    results = [run_check(*c, profile_ops=args.profile) for c in CHECKS]
    text = markdown(results, env)
    stem = args.out / (f"bench_cpu-t{args.threads}" if args.threads else "bench_cpu")
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
