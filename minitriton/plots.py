"""PNG plots of the similarity diagnostics and of the PPL / compression trade-off (matplotlib,
Agg backend: no display needed).

Example:
    >>> plot_similarity(similarity(states), "out/similarity.png", costs=report.pair_costs)
    >>> plot_tradeoff({"minicache": [(1.28, 95.7)], ...}, "out/tradeoff.png", full_ppl=28.2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def _save(plt, fig, path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_similarity(sims: list, path, costs: Optional[list] = None) -> Path:
    """Per adjacent pair (l, l+1): mean key and value cosine similarity; with `costs` (the
    `pair_costs` of a calibration report), a second panel with each pair's merge cost (% PPL)."""
    plt = _pyplot()
    rows = 2 if costs else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), sharex=True, squeeze=False)
    x = [d["pair"][0] for d in sims]
    ax = axes[0][0]
    ax.plot(x, [d["key_cos"] for d in sims], "o-", label="keys")
    ax.plot(x, [d["value_cos"] for d in sims], "s-", label="values")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("cosine(layer l, l+1)")
    ax.set_title("Adjacent-layer KV similarity")
    ax.legend()
    if costs:
        ax = axes[1][0]
        ax.bar([c["pair"][0] for c in costs], [c["cost_pct"] for c in costs], color="tab:red")
        ax.set_ylabel("PPL change (%)\nmerging this pair alone")
    axes[-1][0].set_xlabel("pair (l, l+1): l")
    return _save(plt, fig, path)


def plot_tradeoff(points: dict, path, full_ppl: Optional[float] = None,
                  budget_pct: Optional[float] = None, title: str = "") -> Path:
    """PPL against KV compression: `points` maps a method name to [(compression, ppl), ...]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>"
    for i, (name, pts) in enumerate(points.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                label=name)
    if full_ppl is not None:
        ax.axhline(full_ppl, color="black", lw=0.8, ls="--", label="dense cache")
        if budget_pct:
            ax.axhline(full_ppl * (1 + budget_pct / 100), color="grey", lw=0.8, ls=":",
                       label=f"+{budget_pct:g}% budget")
    ax.set_xlabel("KV compression (dense bytes / bytes held)")
    ax.set_ylabel("perplexity")
    ys = [p[1] for pts in points.values() for p in pts] + ([full_ppl] if full_ppl else [])
    if ys and min(ys) > 0 and max(ys) / min(ys) >= 3:   # (a narrow range stays linear: a log
        ax.set_yscale("log")                             # axis's integer labels would repeat)
        from matplotlib.ticker import FormatStrFormatter
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_title(title or "MiniCache on SmolLM2-135M: quality against compression")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
