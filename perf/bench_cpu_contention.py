"""The torch path's merge on CPU cores that another process keeps busy (not a timed test).

    python perf/bench_cpu_contention.py [--out DIR] [--shape B,H,S,D] [--rounds N]

The merge of two float32 layers and one torch.add of the same inputs (its baseline in
perf/bench_cpu.py) are timed in alternation, ROUNDS times, medians, in a fresh process for each
OpenMP setting (torch's default; OMP_WAIT_POLICY=PASSIVE; one thread), first on idle cores,
then with a second process running small torch ops in a loop on all cores (what a second
experiment, or a data loader using torch, does). The merge runs a few hundred small torch ops,
each a parallel region of torch's OpenMP pool, where the add is one. Results are printed and
written as bench_cpu_contention.md and .json into DIR (default perf/results/cpu/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minitriton.cli import _shape  # noqa: E402  (B,H,S,D, as `synthetic --shape`)
from perf.timing import REPO_ROOT, positive_int, writable_dir  # noqa: E402

SETTINGS = (   # name, environment
    ("default", {}),
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 thread", {"OMP_NUM_THREADS": "1"}),
)
# The busy neighbour: small elementwise ops and row sums, on torch's default threads, until
# its parent (argv[1]) is gone, however that ends.
NEIGHBOUR = ("import os, sys, torch\nparent = int(sys.argv[1])\nx = torch.randn(64, 4096)\n"
             "while os.getppid() == parent:\n    (x * 2 + 1).sum(dim=-1)\n")


def _worker(shape, rounds: int) -> dict:
    """In this process: medians (ms) of merge and add, timed in alternation."""
    import torch

    import minitriton
    from perf.bench_cpu import _time_interleaved
    from perf.timing import summarize

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    samples = _time_interleaved({"merge": lambda: minitriton.merge(x, y),
                                 "add": lambda: torch.add(x, y)}, rounds)
    ms = {n: summarize(v).median_ms for n, v in samples.items()}
    return dict(ms, threads=torch.get_num_threads())


def _run_setting(env_extra: dict, shape, rounds: int) -> dict:
    env = dict(os.environ, MINITRITON_BACKEND="torch", **env_extra)
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        if name not in env_extra:
            env.pop(name, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "--shape", ",".join(map(str, shape)), "--rounds", str(rounds)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the worker failed ({' '.join(cmd)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_alive(neighbour) -> None:
    if neighbour is not None and neighbour.poll() is not None:
        raise RuntimeError(f"the busy neighbour exited ({neighbour.returncode}): the busy "
                           f"figures would be idle ones")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "perf" / "results" / "cpu")
    ap.add_argument("--shape", type=_shape, default=(4, 8, 4096, 128), help="B,H,S,D")
    ap.add_argument("--rounds", type=positive_int, default=9)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.shape, args.rounds)))
        return 0
    writable_dir(ap, args.out)
    import torch

    from perf.timing import environment
    env = environment(torch.device("cpu"))
    rows = []
    for load in ("idle", "busy neighbour"):
        neighbour = None
        if load != "idle":
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(os.getpid())])
            time.sleep(2.0)   # (its start-up)
        try:
            for name, extra in SETTINGS:
                _check_alive(neighbour)
                r = _run_setting(extra, args.shape, args.rounds)
                _check_alive(neighbour)
                rows.append(dict(load=load, setting=name, **r))
                print(f"{load:15s} {name:24s} merge {r['merge']:9.1f} ms  add "
                      f"{r['add']:7.1f} ms", file=sys.stderr)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    shape = list(args.shape)
    text = ["# minitriton: the torch path's merge beside a busy process", ""]
    text += [f"- {k}: {v}" for k, v in env.items()]
    text += [f"- point: merge of two {shape} float32 layers; baseline one torch.add",
             f"- rounds: {args.rounds} (medians); each setting in a fresh process", "",
             "| cores | setting | threads | merge ms | add ms | merge / add |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        text.append(f"| {r['load']} | {r['setting']} | {r['threads']} | {r['merge']:.1f} "
                    f"| {r['add']:.1f} | {r['merge'] / r['add']:.2f}x |")
    text = "\n".join(text) + "\n"
    stem = args.out / "bench_cpu_contention"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"environment": env, "shape": shape, "rounds": args.rounds, "results": rows},
        indent=2) + "\n")
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
