"""Perplexity of a model whose KV cache is merged by MiniCache (`python -m minitriton eval`).

Protocol (deterministic; no sampling):
- Tokenise the whole text once: `tokenizer(text).input_ids` (default special tokens).
- Window w = 0, 1, 2, 3: prefix = tokens[768 w : 768 w + 512], continuation = the next 256.
- Prefill the prefix through the model; its states fill a fresh `MiniCacheHF` per config (the
  merges happen there; one prefill per window serves all configs, see `prefill`), then score
  the continuation in ONE forward pass over that cache (teacher forcing: the 255 appended
  tokens stay in the uncompressed tail). The first continuation token is predicted from
  the prefill's last logits.
- PPL = exp(mean NLL over the 4 x 256 continuation tokens). Compression = dense bytes / bytes
  held after the prefill, over all layers (every byte counted, see `MiniCache.nbytes`).

Example:
    >>> model, tok = minitriton.assets.load_model()
    >>> results = evaluate(model, tok, load_text(), configs=default_configs(30))
    >>> print(format_table(results))
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_index
from .cache import DEFAULT_WINDOW, MergePlan

PREFIX, CONTINUATION, STRIDE, WINDOWS = 512, 256, 768, 4


@dataclass
class Window:
    prefix: torch.Tensor        # [1, PREFIX] int64
    continuation: torch.Tensor  # [1, CONTINUATION] int64


def token_windows(ids, n_windows: int = WINDOWS, *, start: int = 0, prefix: int = PREFIX,
                  continuation: int = CONTINUATION, stride: int = STRIDE) -> list[Window]:
    """Windows w = 0..n-1: prefix = ids[start + stride w : ... + prefix], then `continuation`."""
    if isinstance(n_windows, bool) or not isinstance(n_windows, numbers.Integral):
        raise TypeError(f"n_windows: expected an int, got {type(n_windows).__name__}")
    if n_windows < 1:
        raise ValueError(f"n_windows: expected at least 1 window, got {n_windows}")
    start = check_index("start", start)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    out = []
    for w in range(n_windows):
        a = start + stride * w
        if a + prefix + continuation > ids.numel():
            if w == 0 and start and prefix + continuation <= ids.numel():
                raise ValueError(f"start: window 0, from token {start}, needs tokens up to "
                                 f"{a + prefix + continuation}, the text has {ids.numel()}")
            if w == 0:
                raise ValueError(f"text: {ids.numel()} tokens, too few for one window "
                                 f"({prefix + continuation} tokens from token {start})")
            raise ValueError(f"n_windows: window {w} needs tokens up to "
                             f"{a + prefix + continuation}, the text has {ids.numel()}")
        out.append(Window(ids[a:a + prefix][None], ids[a + prefix:a + prefix + continuation][None]))
    return out


# The names of the plans `default_configs` always gives, in its order.
DEFAULT_CONFIGS = ("full", "minicache", "minicache-proj", "mean")


def default_configs(num_layers: int, calibrated: Optional[dict] = None, *,
                    updating: Optional[int] = None) -> dict:
    """The compared plans: full, minicache (paper: pairs from L // 2, t=0.6, gamma=0.05, norm),
    minicache-proj, mean (the paper's averaging baseline, same pairs), and any calibrated ones.

    `updating`: how many leading layers update the cache (default all `num_layers`); a model
    whose last layers reuse earlier layers' states (`num_kv_shared_layers`, Gemma 3n) has
    the paper's pairs taken over the others, with L the number of those, as `MiniCacheHF`
    does (`evaluate` passes it from the model's config)."""
    num_layers = check_index("num_layers", num_layers, low=1)
    L = num_layers if updating is None else check_index("updating", updating, low=1)
    if L > num_layers:
        raise ValueError(f"updating: expected at most num_layers={num_layers}, got {L}")
    configs = {
        "full": MergePlan([]),
        "minicache": MergePlan.paper(L),
        "minicache-proj": MergePlan.paper(L, magnitude="projection"),
        "mean": MergePlan.paper(L, method="mean"),
    }
    configs.update(calibrated or {})
    return configs


def _forward(model, ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
    """Logits `[S, V]` (or `[1, V]` with last_only) of one forward over `cache`."""
    from .hf import cache_kwargs, forward_params
    kwargs = cache_kwargs(model, cache)
    if last_only and "logits_to_keep" in forward_params(model):
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=ids, use_cache=True, **kwargs)
    logits = out.logits[0]
    return logits[-1:] if last_only else logits


@torch.no_grad()
def prefill(model, prefix: torch.Tensor):
    """Run the prefix once: `(last_logits [1, V], states)`, states = [(k, v)] per layer as the
    model's attention layers handed them to the cache, `[1, H, PREFIX, D]` ((None, None) for
    a layer that reuses another's states and never updates the cache).

    A prefill's logits and states do not depend on the merge plan: a pair's first chunk is
    attended at full precision (see `minitriton.cache`). So one prefill serves every config:
    `cache_from_states` feeds these states to a plan's cache exactly as the layers would, and
    the result is identical to prefilling through that cache (tests/test_eval.py checks it).
    """
    from .hf import MiniCacheHF
    record = MiniCacheHF(model.config, [])
    first = _forward(model, prefix, record, last_only=True)
    states = [record.core.get(i) for i in range(record.core.num_layers)]
    return first, states


def cache_from_states(model, plan, states, *, window: int = DEFAULT_WINDOW):
    """A fresh `MiniCacheHF` for `plan` holding the prefill `states` (merges happen here)."""
    from .hf import MiniCacheHF
    cache = MiniCacheHF(model.config, plan, window=window)
    for layer, (k, v) in enumerate(states):
        if k is not None:   # (None: a layer that reuses another's states never updates)
            cache.core.update(layer, k, v)
    return cache


@torch.no_grad()
def score_continuation(model, cache, first: torch.Tensor, continuation: torch.Tensor) -> float:
    """NLL sum of `continuation` [1, C]: token 0 from `first` (the prefill's last logits), the
    rest from ONE forward of continuation[:, :-1] over `cache` (teacher forcing)."""
    rest = _forward(model, continuation[:, :-1], cache)                 # [C - 1, V]
    logits = torch.cat([first, rest]).float()
    return float(torch.nn.functional.cross_entropy(logits, continuation[0], reduction="sum"))


@torch.no_grad()
def score_window(model, win: Window, plan, *, window: int = DEFAULT_WINDOW,
                 prefilled=None) -> dict:
    """NLL sum over the continuation of one window, and the cache's bytes after the prefill.
    `prefilled`: the window's `prefill(...)` result, to share it between plans."""
    first, states = prefill(model, win.prefix) if prefilled is None else prefilled
    cache = cache_from_states(model, plan, states, window=window)
    after = dict(nbytes=cache.nbytes, dense_nbytes=cache.dense_nbytes,
                 retained=cache.core.retained_fraction())
    nll = score_continuation(model, cache, first, win.continuation)
    return dict(nll=nll, tokens=int(win.continuation.numel()), **after)


def evaluate_plans(model, wins, configs: dict, *, window: int = DEFAULT_WINDOW, bar=None,
                   prefilled=None) -> dict:
    """name -> {"ppl", "compression", "nbytes", "dense_nbytes", "retained"} over `wins`."""
    wins = list(wins)
    if not wins:
        raise ValueError("wins: expected at least one window, got none")
    prefilled = prefilled or [prefill(model, w.prefix) for w in wins]
    out = {}
    for name, plan in configs.items():
        t0 = time.perf_counter()
        nll = tokens = nbytes = dense = 0
        kept = []
        for win, pre in zip(wins, prefilled):
            r = score_window(model, win, plan, window=window, prefilled=pre)
            nll, tokens = nll + r["nll"], tokens + r["tokens"]
            nbytes, dense = nbytes + r["nbytes"], dense + r["dense_nbytes"]
            if r["retained"] is not None:
                kept.append(r["retained"])
            if bar is not None:
                bar.set_postfix_str(name)
                bar.update(1)
        out[name] = dict(ppl=math.exp(nll / tokens), compression=dense / max(nbytes, 1),
                         nbytes=nbytes, dense_nbytes=dense,
                         retained=sum(kept) / len(kept) if kept else None,
                         seconds=time.perf_counter() - t0)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, text: str, configs: Optional[dict] = None, *,
             n_windows: int = WINDOWS, window: int = DEFAULT_WINDOW, progress: bool = True,
             ids=None) -> dict:
    """PPL and compression of each config (name -> MergePlan), in the order given.

    Returns name -> {"ppl", "ppl_change_pct" (vs "full", when present), "compression",
    "nbytes", "dense_nbytes", "retained" (fraction of merged token pairs kept, or None),
    "pairs" (the plan, one line per pair), "seconds"}.
    """
    from .hf import _updating_layers
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if configs is None:
        configs = default_configs(num_layers, updating=_updating_layers(model.config))
    if ids is None:
        ids = tokenizer(text).input_ids
    wins = token_windows(ids, n_windows)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(len(configs) + 1) * len(wins), desc="eval", unit="window", leave=False)
    prefilled = []
    for w in wins:
        prefilled.append(prefill(model, w.prefix))
        if bar is not None:
            bar.set_postfix_str("prefill")
            bar.update(1)
    results = evaluate_plans(model, wins, configs, window=window, bar=bar, prefilled=prefilled)
    for name, plan in configs.items():
        plan_obj = plan if isinstance(plan, MergePlan) else MergePlan(plan, num_layers=num_layers)
        results[name]["pairs"] = plan_obj.describe() if len(plan_obj) else []
    if bar is not None:
        bar.close()
    if "full" in results:
        base = results["full"]["ppl"]
        for r in results.values():
            r["ppl_change_pct"] = 100.0 * (r["ppl"] / base - 1.0)
    return results


def format_table(results: dict) -> str:
    """A fixed-width table: config, PPL, change vs full (%), compression, retained (%)."""
    lines = [f"{'config':<22} {'PPL':>9} {'dPPL %':>9} {'KV compr.':>10} {'retained':>9}"]
    for name, r in results.items():
        change = r.get("ppl_change_pct")
        kept = r.get("retained")
        lines.append(f"{name:<22} {r['ppl']:>9.3f} "
                     f"{('%+.2f' % change) if change is not None else '-':>9} "
                     f"{r['compression']:>9.3f}x "
                     f"{('%.1f%%' % (100 * kept)) if kept is not None else '-':>9}")
    return "\n".join(lines)


def format_plans(results: dict, names=None) -> str:
    """The per-pair settings of the given (default: all merged) configs."""
    out = []
    for name, r in results.items():
        if (names is None or name in names) and r.get("pairs"):
            out.append(f"{name}: " + "; ".join(r["pairs"]))
    return "\n".join(out)
