"""One timer for every op and baseline, and the stamp that says where figures were measured.

On CUDA, `triton.testing.do_bench` times each call between CUDA events with the L2 cache
flushed before it, so a point reads its bytes from HBM as a cold decode step would. On a CPU
do_bench cannot run (Triton's interpreter has "0 active drivers"), so `time.perf_counter` is
read around each call after a warm-up, with the same quantiles reported.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTILES = (0.5, 0.2, 0.8)
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


def writable_dir(ap, path: Path, flag: str = "--out") -> Path:
    """Create `path` (a results folder) now, so that a bad one fails before any measurement,
    with one line from the parser `ap`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        ap.error(f"{flag} {path}: cannot create the folder ({err.strerror})")
    if not os.access(path, os.W_OK):
        ap.error(f"{flag} {path}: the folder is not writable")
    return path


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bench_cpu(fn, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 5, max_reps: int = 10_000) -> Timing:
    """Time `fn()` with `time.perf_counter`: warm up for `warmup_ms` (at least one call), then
    call it until `rep_ms` have passed (at least `min_reps`, at most `max_reps` calls)."""
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def summarize(samples_ms: list[float]) -> Timing:
    """The median, p20 and p80 of per-call times in milliseconds."""
    ordered = sorted(samples_ms)
    return Timing(*(_quantile(ordered, q) for q in QUANTILES))


def bench(fn, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Median, p20 and p80 milliseconds of `fn()` on `device` (see the module docstring)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                quantiles=list(QUANTILES))
        return Timing(float(med), float(p20), float(p80))
    return bench_cpu(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


def host_ms_per_call(fn, device: torch.device, budget_ms: float = 20.0,
                     median_ms: float = 0.0) -> float:
    """Wall-clock milliseconds per call of `fn` called back to back, with one synchronisation
    at the end: the steady-state cost of a call including Python and the launches, which
    do_bench's events can hide behind the L2 flush that precedes each call. `median_ms` (e.g.
    do_bench's) sizes the number of calls to about `budget_ms`."""
    n = int(min(1000, max(10, budget_ms / max(median_ms, 1e-3))))
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / n


# ---- where the figures come from ------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device: torch.device) -> str:
    """A folder name for results: "cpu", or the GPU's name in lower case ("nvidia-h200")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def git_commit() -> str:
    """The checkout's commit (with "-dirty" when files other than perf/results/ differ from it:
    a run that rewrites earlier results is not a change of the code). A copied tree without
    .git takes it from $MINITRITON_COMMIT or a file COMMIT at the repository root."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                     "--", ".", ":(exclude)perf/results"],
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
            return head.stdout.strip() + dirty
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("MINITRITON_COMMIT", "").strip():
        return os.environ["MINITRITON_COMMIT"].strip()
    commit_file = REPO_ROOT / "COMMIT"
    if commit_file.is_file():
        return commit_file.read_text().strip() or "unknown"
    return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """The stamp written next to every result."""
    import triton

    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        env["cuda"] = str(torch.version.cuda)
    else:
        env["threads"] = str(torch.get_num_threads())
        if hasattr(os, "getloadavg"):  # a CPU shared with other work gives slower, noisier figures
            env["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        env["cpus"] = str(os.cpu_count())
    return env
