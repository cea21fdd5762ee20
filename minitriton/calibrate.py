"""Per-pair similarity diagnostics and calibration of a merge plan
(`python -m minitriton calibrate`).

MiniCache assumes that adjacent layers' key/value states point the same way. `similarity`
measures it (mean cosine of the two layers' states, per adjacent pair). `calibrate` then searches
which pairs to merge, and with which settings, on calibration text disjoint from the evaluation
windows (by default tokens from 768 * 4 on; the eval windows end there):

1. Screen: every adjacent pair (l, l+1) alone, with one setting, scored on short windows
   (two windows, 128 continuation tokens): the cost (increase in PPL) of merging that pair.
   (Only layers that update the cache: a model's last `num_kv_shared_layers` layers, which
   reuse earlier layers' states, are in no pair.)
2. Settings: for the cheapest pairs, a small grid of per-pair settings (t in {0, 0.6, 1},
   magnitude norm / projection); the cheapest setting wins. gamma stays small (0.05): retaining
   tokens costs 2 x D values each, so gamma = 0.3 (15-19% retained on this model) cancels most
   of the bytes for a small gain. The first `sink` tokens are kept dense (attention sinks).
3. Assemble: add the pairs, cheapest first (skipping overlaps), measuring the whole plan's PPL
   on the calibration windows; the "budget" plan is the largest one within the PPL budget
   (default +3% over the dense cache), the "matched" plan continues until its compression
   reaches `match_compression` (e.g. the paper plan's), for comparisons at equal compression.

Example:
    >>> plan = minitriton.calibrate(model, tokenizer)                 # a MergePlan
    >>> report = calibrate(model, tokenizer, return_report=True)      # plans, costs, curve
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ._checks import check_bool, check_index, check_real
from .cache import DEFAULT_WINDOW, MergePlan, PairSpec
from .evaluate import STRIDE, WINDOWS, evaluate_plans, prefill, token_windows

CALIBRATION_START = STRIDE * WINDOWS   # the eval windows use tokens [0, 3072)
DEFAULT_TOP = 14   # cheapest pairs that get the settings grid (the shipped plans used 14)
SETTINGS = (  # (t, magnitude) tried per pair in step 2
    (0.6, "projection"), (0.0, "projection"), (1.0, "projection"), (0.6, "norm"),
)


def _token_ids(ids) -> torch.Tensor:
    """`ids` (a sequence, array or tensor of token ids; `[N]` or `[1, N]`) as a long `[N]`."""
    try:
        out = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"ids: expected token ids (a sequence or tensor of ints), got "
                        f"{type(ids).__name__} ({err})") from None
    if out.numel() == 0:
        raise ValueError("ids: expected token ids, got none")
    if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise TypeError(f"ids: expected integer token ids, got dtype {out.dtype}")
    if out.dim() == 2 and out.shape[0] == 1:
        out = out[0]
    if out.dim() != 1:
        raise ValueError(f"ids: expected a [N] (or [1, N]) sequence of token ids, got shape "
                         f"{tuple(out.shape)}")
    return out.to(torch.long)


@torch.no_grad()
def similarity(states_by_window) -> list[dict]:
    """Per adjacent pair (l, l+1): mean cosine similarity of the two layers' keys and values
    (over windows, heads, tokens), and the mean angular distance d = arccos(cos) / pi of keys.

    states_by_window: a list (one per window) of per-layer `(k, v)` `[B, H, S, D]` states
    (a pair with a layer whose states are None, one that never updates the cache, is left out).
    """
    L = len(states_by_window[0])
    out = []
    for l in range(L - 1):
        if any(states[i][0] is None for states in states_by_window for i in (l, l + 1)):
            continue   # (a layer that reuses another's states has none of its own)
        kc = vc = kd = 0.0
        for states in states_by_window:
            (k0, v0), (k1, v1) = states[l], states[l + 1]
            ck = torch.nn.functional.cosine_similarity(k0.float(), k1.float(), dim=-1)
            cv = torch.nn.functional.cosine_similarity(v0.float(), v1.float(), dim=-1)
            kc += float(ck.mean())
            vc += float(cv.mean())
            kd += float(torch.arccos(ck.clamp(-1, 1)).mean() / math.pi)
        n = len(states_by_window)
        out.append(dict(pair=(l, l + 1), key_cos=kc / n, value_cos=vc / n, key_dist=kd / n))
    return out


@dataclass
class CalibrationReport:
    plan: MergePlan                       # the budget plan
    plans: dict                           # name -> MergePlan ("calibrated", "calibrated-matched")
    full_ppl: float
    budget_pct: float
    similarity: list                      # see `similarity`
    pair_costs: list                      # per pair: dict(pair, cost_pct, best setting)
    curve: list = field(default_factory=list)   # [(n_pairs, compression, ppl)] while adding
    order: list = field(default_factory=list)   # PairSpecs in the order they were added
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"dense PPL on the calibration windows: {self.full_ppl:.3f}; "
                 f"budget +{self.budget_pct:g}%"]
        for name, plan in self.plans.items():
            lines.append(f"{name}: {len(plan)} pairs: " + "; ".join(plan.describe()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(plans={k: [vars(s) for s in p] for k, p in self.plans.items()},
                    full_ppl=self.full_ppl, budget_pct=self.budget_pct,
                    similarity=[dict(d, pair=list(d["pair"])) for d in self.similarity],
                    pair_costs=self.pair_costs, curve=self.curve,
                    order=[vars(s) for s in self.order], seconds=self.seconds)


def calibrate(model, tokenizer, text: Optional[str] = None, *, ids=None,
              budget_pct: float = 3.0, start: int = CALIBRATION_START, n_windows: int = 4,
              sink: int = 4, gamma: float = 0.05, top: int = DEFAULT_TOP,
              match_compression: Optional[float] = None, window: int = DEFAULT_WINDOW,
              progress: bool = True, return_report: bool = False):
    """Choose the pairs and per-pair settings (t, magnitude, sink) that give the most
    compression with PPL within `budget_pct` % of the dense cache's, on calibration text.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer.
        text / ids: the calibration text (default: the embedded text), or its token ids.
        budget_pct: allowed PPL increase over the dense cache, in percent.
        start: first calibration token (default 3072, after the evaluation windows).
        n_windows: calibration windows (512 prefix + 256 continuation, stride 768); 4 by
            default (tokens 3072 to 6144 of the embedded text).
        sink, gamma: per-pair sink tokens and retention threshold.
        top: how many of the cheapest pairs get the settings grid and may enter the plan
            (default 14, as `python -m minitriton calibrate`).
        match_compression: also build "calibrated-matched", adding pairs until the plan's
            compression reaches this (default: that of the paper's plan on these windows).
        window: W of the caches it evaluates (each prefix is merged whole at the prefill and
            the scored tokens stay in the tail, so W does not change the scores).
        progress: show a progress bar (tqdm, when installed) on stderr.
        return_report: return a `CalibrationReport` instead of the budget `MergePlan`.
    """
    t_start = time.perf_counter()
    budget_pct = check_real("budget_pct", budget_pct, "a percentage > 0")
    if not 0.0 < budget_pct < math.inf:
        raise ValueError(f"budget_pct: expected a percentage > 0, got {budget_pct!r}")
    start = check_index("start", start)
    top = check_index("top", top, low=1)
    PairSpec(0, gamma=gamma, sink=sink)        # their checks, before any work
    window = check_index("window", window, low=1)
    if match_compression is not None:
        match_compression = check_real("match_compression", match_compression,
                                       "a compression ratio >= 1")
        if not 1.0 <= match_compression < math.inf:
            raise ValueError(f"match_compression: expected a compression ratio >= 1, got "
                             f"{match_compression!r}")
    progress, return_report = check_bool("progress", progress), check_bool("return_report",
                                                                           return_report)
    if ids is None:
        if text is None:
            from .assets import load_text
            text = load_text()
        elif not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizer to encode the text (or pass "
                            f"ids), got {type(tokenizer).__name__}")
        ids = tokenizer(text).input_ids
    ids = _token_ids(ids)
    wins = token_windows(ids, n_windows, start=start)
    screen = token_windows(ids, min(n_windows, 2), start=start, continuation=128)
    from .hf import _updating_layers
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    updating = _updating_layers(model.config)   # (the layers a pair may include)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="calibrate", unit="eval", leave=False)

    def run(wins_, pre_, configs):
        if bar is not None:
            bar.total = (bar.total or 0) + len(configs) * len(wins_)
        return evaluate_plans(model, wins_, configs, window=window, bar=bar, prefilled=pre_)

    pre = [prefill(model, w.prefix) for w in wins]
    pre_screen = pre[:len(screen)]    # the same prefixes: shorter continuations only
    sims = similarity([states for _, states in pre])

    # 1. screen every adjacent pair with one setting
    base_screen = run(screen, pre_screen, {"full": MergePlan([])})["full"]["ppl"]
    spec0 = dict(t=SETTINGS[0][0], magnitude=SETTINGS[0][1], gamma=gamma, sink=sink)
    screened = run(screen, pre_screen, {l: MergePlan([PairSpec(l, **spec0)])
                                        for l in range(updating - 1)})
    cost = {l: 100 * (r["ppl"] / base_screen - 1) for l, r in screened.items()}
    best = {l: PairSpec(l, **spec0) for l in cost}

    # 2. a settings grid for the cheapest pairs
    cheapest = sorted(cost, key=cost.get)[:top]
    grid = {}
    for l in cheapest:
        for t, mag in SETTINGS[1:]:
            grid[(l, t, mag)] = MergePlan([PairSpec(l, t=t, magnitude=mag, gamma=gamma,
                                                    sink=sink)])
    for (l, t, mag), r in run(screen, pre_screen, grid).items():
        c = 100 * (r["ppl"] / base_screen - 1)
        if c < cost[l]:
            cost[l], best[l] = c, PairSpec(l, t=t, magnitude=mag, gamma=gamma, sink=sink)

    # 3. assemble, cheapest first, measuring the whole plan on the calibration windows
    ref = run(wins, pre, {"full": MergePlan([]), "paper": MergePlan.paper(updating)})
    full_ppl = ref["full"]["ppl"]
    target = match_compression or ref["paper"]["compression"]
    chosen, order, curve = [], [], [(0, 1.0, full_ppl)]
    budget_plan = MergePlan([])
    matched = None
    for l in sorted(cheapest, key=cost.get):
        if any(abs(l - s.prev) < 2 for s in chosen):
            continue
        trial = MergePlan(chosen + [best[l]], num_layers=num_layers)
        r = run(wins, pre, {"trial": trial})["trial"]
        within = r["ppl"] <= full_ppl * (1 + budget_pct / 100)
        if within or matched is None:
            chosen.append(best[l])
            order.append(best[l])
            curve.append((len(chosen), r["compression"], r["ppl"]))
            if within and len(budget_plan) == len(chosen) - 1:
                budget_plan = trial
            if r["compression"] >= target and matched is None:
                matched = trial
                break
    if bar is not None:
        bar.close()
    plans = {"calibrated": budget_plan}
    if matched is not None:
        plans["calibrated-matched"] = matched
    pair_costs = [dict(pair=[l, l + 1], cost_pct=cost[l], setting=best[l].describe())
                  for l in sorted(cost)]
    report = CalibrationReport(plan=budget_plan, plans=plans, full_ppl=full_ppl,
                               budget_pct=budget_pct, similarity=sims, pair_costs=pair_costs,
                               curve=curve, order=order, seconds=time.perf_counter() - t_start)
    return report if return_report else budget_plan


# ---- plans calibrated on the embedded model -----------------------------------------------------
# `python -m minitriton calibrate` on SmolLM2-135M-Instruct (Q4_1, float32), 4 calibration windows
# from token 3072 of the embedded text (disjoint from the eval windows), budget +3%, 489 s.
# "order" is the sequence in which the greedy search added pairs (the calibrated curve). Measured
# there: dense PPL 28.34; (pairs, compression, PPL):
# (1, 1.03x, 28.87), (2, 1.07x, 28.93), (3, 1.10x, 29.07), (4, 1.14x, 29.55),
# (5, 1.18x, 29.89), (6, 1.23x, 30.37), (7, 1.28x, 32.28), (8, 1.33x, 32.50).
SMOLLM2_135M = {
    "order": [
        dict(prev=16, t=0.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=28, t=0.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=3, t=0.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=25, t=0.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=5, t=1.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=18, t=1.0, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=20, t=0.6, gamma=0.05, magnitude="projection", sink=4),
        dict(prev=8, t=0.0, gamma=0.05, magnitude="projection", sink=4),
    ],
    "calibrated": 3,           # number of leading pairs of "order" in each plan: within +3%
    "calibrated-matched": 8,   # compression >= the paper plan's
}


# The names of the plans `shipped_plans` gives for the embedded model.
SHIPPED_PLANS = tuple(name for name in ("calibrated", "calibrated-matched") if SMOLLM2_135M[name])


# The embedded model's (layers, hidden size, KV heads, head dim).
SMOLLM2_135M_SHAPE = (30, 576, 3, 64)


def _is_smollm2_135m(model) -> bool:
    cfg = model.config.get_text_config(decoder=True)
    return (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads,
            getattr(cfg, "head_dim", 64)) == SMOLLM2_135M_SHAPE


def shipped_order(model) -> list:
    """The calibrated pairs for the embedded model, in the order the search added them."""
    if not _is_smollm2_135m(model):
        return []
    return [PairSpec(**p) for p in SMOLLM2_135M["order"]]


def shipped_plans(model) -> dict:
    """name -> MergePlan calibrated for the embedded model ({} for another model)."""
    order = shipped_order(model)
    if not order:
        return {}
    return {name: MergePlan(order[:SMOLLM2_135M[name]], num_layers=SMOLLM2_135M_SHAPE[0])
            for name in SHIPPED_PLANS}
