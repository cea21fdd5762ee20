"""Measure minitriton's ops over a grid of shapes and dtypes, next to their baselines.

    python -m perf.sweep --op merge|restore|decode|all [--quick] [--grid quick|check|full]
                         [--out DIR] [--device cpu|cuda]

Writes <op>-<grid>.csv, .md and -bandwidth.png / -roofline.png into DIR (default
perf/results/<device-tag>/). --quick is the tiny grid on the CPU (the torch path): it checks
that the harness works and says nothing about speed. Exit status 1 when an op failed at some
point; a baseline that fails or a point that does not fit in memory is a note, not a failure.
See docs/perf.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from . import report
from .cases import (DTYPE_NAMES, GRIDS, OPS, build, compute_roof_flops, describe, grid, missing,
                    op_backend)
from .timing import (REPO_ROOT, bench, device_tag, environment, host_ms_per_call, positive_int,
                     writable_dir)

# (warm-up ms, measured ms) per call of the timer: the tiny grid needs little of either.
BUDGET_MS = {"quick": (5.0, 20.0), "check": (25.0, 100.0), "full": (25.0, 100.0)}
ROOF_N = {"cuda": 4096, "cpu": 256}


@contextlib.contextmanager
def _environ(overrides: dict):
    """Set environment variables for the block (MINITRITON_BACKEND is read at every call)."""
    old = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _simple_progress(items, desc)
    return tqdm(items, desc=desc, unit="point", file=sys.stderr)


def _simple_progress(items, desc: str):
    n = len(items)
    for i, item in enumerate(items, 1):
        print(f"\r{desc}: {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
        yield item


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_point(p, device, budget, rows, notes, errors) -> None:
    try:
        case = build(p, device)
    except torch.cuda.OutOfMemoryError:
        notes.append(f"{p.op} {p.dtype_name} {p.label}: skipped, out of device memory")
        return
    except Exception as exc:  # the op failed while building its inputs: a failure
        errors.append(f"{p.op} {p.dtype_name} {p.label}: {type(exc).__name__}: {exc}")
        return
    notes.extend(case.notes)
    base = describe(p) | {"in_bytes": case.in_bytes, "compressed_bytes": case.compressed_bytes,
                          "dense_bytes": case.dense_bytes,
                          "compressed_vs_dense": case.compressed_bytes / case.dense_bytes,
                          "flops": case.flops}
    for prov in case.providers:
        where = f"{p.op} {p.dtype_name} {p.label} [{prov.name}]"
        try:
            with _environ(prov.env):
                fn = prov.make()
                t = bench(fn, device, *budget)
                host = (host_ms_per_call(fn, device, median_ms=t.median_ms)
                        if device.type == "cuda" and prov.name == "op" else None)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"{where}: not measured, out of device memory")
            continue
        except Exception as exc:  # the op failing is an error; a baseline failing, a note
            (errors if prov.name == "op" else notes).append(
                f"{where}: {type(exc).__name__}: {exc}")
            continue
        finally:
            fn = None
            _free(device)
        backend = {"op": op_backend(device), "flash": "flash-attn"}.get(prov.name, "torch")
        rows.append(base | {"provider": prov.name, "backend": backend, "bytes": prov.bytes,
                            "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                            "host_ms": host})
    del case
    _free(device)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(ops, grid_name: str, device: torch.device, out_dir: Path, progress: bool = True):
    """Measure `ops` over grid `grid_name` on `device`; write the results into `out_dir`.

    Returns (paths written, error lines). Ops that minitriton does not provide are skipped
    with a message on stderr."""
    points, notes, errors, rows = [], [], [], []
    for op in ops:
        why = missing(op)
        if why:
            msg = f"skipping {op}: {why}"
            print(msg, file=sys.stderr)
            notes.append(msg)
        else:
            points += grid(op, grid_name)
    env = environment(device)
    env["op backend"] = op_backend(device)
    env["grid"] = grid_name
    if not points:
        return [], errors + ["no op could be measured: " + "; ".join(notes)]
    budget = BUDGET_MS[grid_name]
    roofs = {}
    for dt in dict.fromkeys(p.dtype for p in points):
        roofs[DTYPE_NAMES[dt]] = compute_roof_flops(
            dt, device, ROOF_N.get(device.type, 256), lambda fn: bench(fn, device, *budget))
    env["matmul roof"] = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in roofs.items())
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"{'all' if len(ops) > 1 else ops[0]}-{grid_name}"
    paths = [prefix.with_suffix(".csv"), prefix.with_suffix(".md")]
    items = _progress(points, f"sweep {'+'.join(ops)} ({grid_name}, {device.type})") \
        if progress else points
    title = f"minitriton perf: {', '.join(ops)} ({grid_name} grid)"
    # A sweep cut short (a timeout's SIGTERM or SIGINT, even where the shell that started it
    # ignores SIGINT) still leaves what it measured: the CSV is rewritten after every point,
    # the Markdown (with the targets' verdicts) on the way out.
    main = threading.current_thread() is threading.main_thread()   # (signals: main only)
    previous = [signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)] \
        if main else None
    try:
        for p in items:
            _measure_point(p, device, budget, rows, notes, errors)
            report.fill_derived(rows)
            report.write_csv(paths[0], rows, env)
    except KeyboardInterrupt:
        errors.append(f"interrupted after {len(rows)} rows: the points after them were not "
                      f"measured")
        raise
    finally:
        if main:
            for sig, handler in zip((signal.SIGTERM, signal.SIGINT), previous):
                signal.signal(sig, handler)
        notes = list(dict.fromkeys(notes)) + [f"ERROR {e}" for e in errors]
        paths[1].write_text(report.markdown(rows, env, notes, title))
    written = report.plot(rows, env, roofs, prefix)
    if not rows:
        print("nothing was measured: no PNG plots", file=sys.stderr)
    elif not written:
        print("matplotlib does not import: no PNG plots", file=sys.stderr)
    return paths + written, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--op", choices=OPS + ("all",), default="all")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny grid on the CPU (torch path); for CI, asserts nothing on speed")
    ap.add_argument("--grid", choices=GRIDS, default=None,
                    help="quick, check (gpu_check.sh's key points) or full (default)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default perf/results/<device-tag>/)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="cpu or cuda (default: cpu with --quick, else cuda when available)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="CPU threads for torch (default: 1 with --quick, else torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick and args.grid not in (None, "quick"):
        ap.error(f"--quick runs the quick grid; drop it to run --grid {args.grid}")
    grid_name = args.grid or ("quick" if args.quick else "full")
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    out = writable_dir(ap, args.out or REPO_ROOT / "perf" / "results" / device_tag(device))
    ops = OPS if args.op == "all" else (args.op,)
    # One thread for the tiny grid: on a shared CI machine, a second thread waiting at a barrier
    # for a descheduled first one turns 0.1 ms calls into 80 ms ones.
    threads = args.threads or (1 if grid_name == "quick" else None)
    saved = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        paths, errors = run(ops, grid_name, device, out, progress=not args.no_progress)
    finally:
        torch.set_num_threads(saved)
    for p in paths:
        print(f"wrote {p}")
    md = [p for p in paths if p.suffix == ".md"]
    if md:
        text = md[0].read_text()
        start = text.find("## Targets")
        print(text[start:text.find("## ", start + 3)].strip())
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
