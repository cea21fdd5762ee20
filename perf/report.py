"""Results of a sweep as CSV (one row per point and provider), a Markdown summary (one table
per op, the targets as PASS/MISS lines) and PNG plots (bandwidth against size; a roofline).

Every file starts with (or, for the PNGs, is titled with) the stamp of `timing.environment`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cases import gib

MIB = 1 << 20
COLUMNS = ("op", "dtype", "B", "H", "Hq", "S", "D", "T", "shape", "provider", "backend",
           "median_ms", "p20_ms", "p80_ms", "host_ms", "bytes", "gbps", "pct_copy", "op_speedup",
           "in_bytes", "compressed_bytes", "dense_bytes", "compressed_vs_dense", "flops",
           "gflops")
# The baselines a Markdown table shows a speedup against, in this order.
BASELINES = ("torch", "sdpa", "flash", "restore+sdpa")


@dataclass(frozen=True)
class Target:
    """A target for an H200. For every op row that `selects` takes, `value(op_row, rows of the
    point by provider)` is the figure (None: not measured there) and `passes` judges it; the
    summary line quotes the `worst` figure."""

    op: str
    text: str
    selects: Callable[[dict], bool]
    value: Callable[[dict, dict], float | None]   # the figure checked, None if not measured
    passes: Callable[[float], bool]
    unit: str
    worst: Callable = min


def _speedup_vs_dense_attention(row, by_provider):
    times = [by_provider[n]["median_ms"] for n in ("sdpa", "flash") if n in by_provider]
    return min(times) / row["median_ms"] if times else None


TARGETS = (
    Target("merge", "merge >= 90% of copy bandwidth at inputs >= 64 MiB",
           lambda r: r["in_bytes"] >= 64 * MIB, lambda r, by: r["pct_copy"],
           lambda v: v >= 90.0, "%"),
    Target("decode", "decode >= 85% of copy bandwidth at S >= 8K",
           lambda r: r["S"] >= 8192, lambda r, by: r["pct_copy"], lambda v: v >= 85.0, "%"),
    Target("decode", "decode <= 1.0x the time of attention over the uncompressed layer "
           "(fastest of sdpa, flash) at S >= 8K",
           lambda r: r["S"] >= 8192, _speedup_vs_dense_attention, lambda v: v >= 1.0, "x faster"),
    Target("decode", "decode >= 3x faster than restore + sdpa at S >= 8K",
           lambda r: r["S"] >= 8192,
           lambda r, by: by["restore+sdpa"]["op_speedup"] if "restore+sdpa" in by else None,
           lambda v: v >= 3.0, "x faster"),
    Target("decode", "decode latency <= 30 us at B = 1, S <= 1K (the larger of the "
           "device time and the host's time per call)",
           lambda r: r["B"] == 1 and r["S"] <= 1024,
           lambda r, by: max(r["median_ms"], r["host_ms"] or 0.0) * 1e3,
           lambda v: v <= 30.0, "us", worst=max),
)


def fill_derived(rows: list[dict]) -> None:
    """GB/s, % of the point's copy bandwidth, the op's speedup and GFLOP/s, in place."""
    for group in _by_point(rows).values():
        copy = group.get("copy")
        op = group.get("op")
        for r in group.values():
            r["gbps"] = r["bytes"] / (r["median_ms"] * 1e-3) / 1e9
        for r in group.values():
            r["pct_copy"] = 100.0 * r["gbps"] / copy["gbps"] if copy else None
            r["op_speedup"] = r["median_ms"] / op["median_ms"] if op else None
            r["gflops"] = (r["flops"] / (r["median_ms"] * 1e-3) / 1e9
                           if r["provider"] == "op" else None)


def _by_point(rows):
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"], r["shape"]), {})[r["provider"]] = r
    return groups


def evaluate_targets(rows: list[dict]) -> list[str]:
    """One line per target: PASS, MISS, or n/a when no measured point qualifies."""
    groups = _by_point(rows)
    lines = []
    swept = {r["op"] for r in rows}
    for tg in (tg for tg in TARGETS if tg.op in swept):
        checked = []
        for by in groups.values():
            r = by.get("op")
            if r is None or r["op"] != tg.op or not tg.selects(r):
                continue
            v = tg.value(r, by)
            if v is not None:
                checked.append((v, r))
        if not checked:
            lines.append(f"n/a  {tg.text}: no measured point of this sweep qualifies")
            continue
        v, r = tg.worst(checked, key=lambda c: c[0])
        ok = all(tg.passes(c[0]) for c in checked)
        lines.append(f"{'PASS' if ok else 'MISS'} {tg.text}: worst {v:.1f} {tg.unit} "
                     f"({r['dtype']} {r['shape']}) over {len(checked)} points")
    return lines


# ---- files ----------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict], env: dict) -> None:
    with open(path, "w", newline="") as f:
        for k, v in env.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k)) for k in COLUMNS})


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def markdown(rows: list[dict], env: dict, notes: list[str], title: str) -> str:
    out = [f"# {title}", ""]
    out += [f"- {k}: {v}" for k, v in env.items()]
    out += ["", "## Targets (set for an H200)", "", "```"] + evaluate_targets(rows) + ["```", ""]
    groups = _by_point(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        present = [b for b in BASELINES
                   if any(b in by for (o, _, _), by in groups.items() if o == op)]
        head = (["dtype", "shape", "backend", "median ms (p20-p80)", "host ms", "GB/s", "% copy",
                 "copy GB/s"]
                + [f"vs {b}" for b in present] + ["compressed / dense"])
        out += [f"## {op}", "", "| " + " | ".join(head) + " |",
                "|" + "|".join("---" for _ in head) + "|"]
        for (o, _, _), by in groups.items():
            r = by.get("op")
            if o != op or r is None:
                continue
            copy = by.get("copy")
            cells = [r["dtype"], r["shape"], r["backend"],
                     f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g})",
                     f"{r['host_ms']:.4g}" if r["host_ms"] is not None else "-",
                     _num(r["gbps"]), _pct(r["pct_copy"]), _num(copy["gbps"]) if copy else "-"]
            cells += [f"{_num(by[b]['op_speedup'])}x" if b in by else "-" for b in present]
            cells.append(f"{gib(r['compressed_bytes'])} / {gib(r['dense_bytes'])} "
                         f"({r['compressed_vs_dense']:.3f})")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["`vs X` = X's median time / the op's: how many times faster the op is than X.",
            "`% copy` = the op's GB/s (its minimum traffic / time) over the GB/s of a "
            "device-to-device copy of the same bytes, measured at the same point.", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _num(v: float) -> str:
    """Three significant figures without an exponent for the usual range, e.g. 0.0123, 4.56,
    78.9, 4012."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}"


def _pct(v):
    return "-" if v is None else f"{_num(v)}%"


def plot(rows: list[dict], env: dict, roofs: dict, prefix: Path) -> list[Path]:
    """-bandwidth.png (each provider's GB/s against the point's input bytes, per op) and
    -roofline.png. Returns the paths written; none when matplotlib does not import or no row
    was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:   # (nothing was measured: no plot to draw)
        return []
    stamp = " | ".join([env["device"], f"torch {env['torch']}", f"triton {env['triton']}"]
                       + ([f"CUDA {env['cuda']}"] if "cuda" in env else [])
                       + [f"commit {env['commit']}", env["date"]])
    paths = []
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        series: dict = {}
        for r in rows:
            if r["op"] == op:
                series.setdefault((r["provider"], r["dtype"]), []).append(r)
        for (prov, dt), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["in_bytes"])
            ax.plot([r["in_bytes"] for r in rs], [r["gbps"] for r in rs], marker="o",
                    linestyle="--" if prov == "copy" else "-", label=f"{prov} {dt}")
        _axes(ax, "the op's input bytes (in_bytes)", "GB/s", op)
    paths.append(_save(plt, fig, stamp, prefix, "bandwidth"))

    fig, ax = plt.subplots(figsize=(7, 5))
    op_rows = [r for r in rows if r["provider"] == "op" and r["gflops"]]
    copy_bw = max((r["gbps"] for r in rows if r["provider"] == "copy"), default=None)
    if op_rows and copy_bw:
        # The memory roof (copy GB/s x FLOP/byte) up to the highest compute roof, which each
        # dtype's matmul throughput draws as a flat line.
        x0 = min(r["flops"] / r["bytes"] for r in op_rows) / 4
        top = max(roofs.values(), default=0.0) / 1e9 or copy_bw * x0 * 1e3
        ax.plot([x0, top / copy_bw], [copy_bw * x0, top], "k-",
                label=f"copy {copy_bw:.0f} GB/s")
        for dt, flops in sorted(roofs.items()):
            ax.axhline(flops / 1e9, linestyle=":", color="gray")
            ax.text(x0, flops / 1e9, f" matmul {dt}", fontsize=7, va="bottom")
        for op in ops:
            rs = [r for r in op_rows if r["op"] == op]
            ax.scatter([r["flops"] / r["bytes"] for r in rs], [r["gflops"] for r in rs],
                       label=op, s=18)
    ax.set_yscale("log")
    _axes(ax, "arithmetic intensity (FLOP / byte)", "GFLOP/s",
          "roofline: measured copy bandwidth and matmul throughput", title_size=9)
    paths.append(_save(plt, fig, stamp, prefix, "roofline"))
    return paths


def _axes(ax, xlabel: str, ylabel: str, title: str, title_size=None) -> None:
    """Log x axis, labels, grid and legend of one panel."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, stamp: str, prefix: Path, kind: str) -> Path:
    """Stamp, lay out, write `<prefix>-<kind>.png` and close the figure."""
    fig.suptitle(stamp, fontsize=8)
    fig.tight_layout()
    path = prefix.with_name(f"{prefix.name}-{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
