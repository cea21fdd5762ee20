"""`python -m minitriton {demo,eval,calibrate}` on the embedded SmolLM2-135M model and text,
and `python -m minitriton synthetic` on a synthetic cache (no model).

    python -m minitriton demo [--out DIR]          generate with and without MiniCache, compare
                                                   quality, write the plots (a few minutes)
    python -m minitriton eval [--json]             the PPL / compression table (4 windows)
    python -m minitriton calibrate [--out F.json]  choose pairs and per-pair settings

The assets ship in PyPI packages (see `minitriton.assets`); a missing one is named with the
command that installs it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from .cache import DEFAULT_WINDOW, MergePlan
from .calibrate import DEFAULT_TOP


# ---- argument types: a bad value is an argparse error (usage + message), before any work ----
def _number(convert, accept, what: str):
    """An argparse type: `convert(text)` if that works and `accept`s it, else an error saying
    "expected <what>"."""
    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    parse.__name__ = what
    return parse


def _int_at_least(low: int):
    return _number(int, lambda v: v >= low, f"an int >= {low}")


_unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")   # (NaN fails)
_budget = _number(float, lambda v: math.isfinite(v) and v > 0, "a percentage > 0")


def _shape(text: str) -> tuple:
    from ._checks import MAX_HEAD_DIM, MIN_HEAD_DIM
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected B,H,S,D (four ints >= 1), got {text!r}")
    if not MIN_HEAD_DIM <= dims[3] <= MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(f"head dim D={dims[3]} is outside the supported "
                                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    return dims


def _windows(start: int = 0):
    """An argparse type: a window count >= 1 that the embedded text holds from token `start`
    (eval: 0; calibrate: after the eval windows)."""
    from .assets import TEXT_TOKENS
    from .evaluate import CONTINUATION, PREFIX, STRIDE
    most = (TEXT_TOKENS - start - PREFIX - CONTINUATION) // STRIDE + 1
    return _number(int, lambda v: 1 <= v <= most,
                   f"an int in [1, {most}] (windows of the embedded text)")


def _out_file(path: str) -> str:
    """An argparse type: a file path whose folder exists and that is not a folder itself."""
    p = Path(path)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} is a folder; expected a file path")
    if not p.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {path!r} does not exist")
    return path


def _out_dir(path: str) -> str:
    """An argparse type: an output folder that can be created and written (checked by creating
    it and a file in it; what the check made is removed again, so that a run that fails
    leaves nothing; the run creates the folder when it writes)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{path!r} is a file; expected a folder")
    made = [q for q in [p, *p.parents] if not q.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=p, prefix=".minitriton-", delete=True)
        probe.close()
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot create the folder {path!r} or a file in it ({err.strerror})") from None
    finally:
        for q in made:           # deepest first
            try:
                q.rmdir()
            except OSError:
                pass
    return path


def _load(args):
    from .assets import load_model, load_text
    t0 = time.perf_counter()
    model, tok = load_model(threads=args.threads, progress=not getattr(args, "no_progress", False))
    text = load_text()
    print(f"loaded SmolLM2-135M-Instruct (float32) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return model, tok, text


def _plan_file(path: str) -> str:
    """An argparse type: the text of a readable plan JSON that parses (its layers are checked
    against the model's once it is loaded)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path!r} ({err.strerror})") from None
    try:
        MergePlan.from_json(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{path!r} is not a plan: {err}") from None
    return text


def _configs(model, args) -> dict:
    from .calibrate import shipped_plans
    from .evaluate import default_configs
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    extra = shipped_plans(model)
    if getattr(args, "plan", None):
        extra["custom"] = _plan_for(args.plan, L)
    configs = default_configs(L, extra)
    if getattr(args, "configs", None) is not None:
        configs = {n: configs[n] for n in _config_names(args.configs, list(configs))}
    return configs


def _plan_for(text: str, num_layers: int) -> MergePlan:
    """The --plan file's plan (its text) for a model of `num_layers` layers; SystemExit naming
    what does not fit."""
    try:
        return MergePlan.from_json(text, num_layers=num_layers)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--plan: not a plan for this {num_layers}-layer model: {err}") from None


def _config_names(spec: str, known: list) -> list:
    """The names in `spec` ("a,b"), each in `known`, with "full" (the baseline of the PPL
    change) and "custom" (the --plan) whenever it is known; SystemExit naming the unknown
    ones."""
    names = [n.strip() for n in spec.split(",")]
    if "full" in known and "full" not in names:
        names.insert(0, "full")         # the baseline of every change
    if "custom" in known and "custom" not in names:
        names.append("custom")          # --plan is always evaluated
    unknown = [n for n in names if n not in known]
    if unknown:
        hint = "" if "custom" in known else " ('custom' is the plan given by --plan)"
        raise SystemExit(f"--configs: unknown {unknown}; known: {known}{hint}")
    return names


def cmd_eval(args) -> int:
    from .calibrate import SHIPPED_PLANS, SMOLLM2_135M_SHAPE
    from .evaluate import DEFAULT_CONFIGS, evaluate, format_plans, format_table
    # Names and the plan are checked before the model loads (and again against it).
    if args.configs is not None:
        _config_names(args.configs, [*DEFAULT_CONFIGS, *SHIPPED_PLANS]
                      + (["custom"] if args.plan else []))
    if args.plan:
        _plan_for(args.plan, SMOLLM2_135M_SHAPE[0])
    model, tok, text = _load(args)
    configs = _configs(model, args)
    t0 = time.perf_counter()
    results = evaluate(model, tok, text, configs, n_windows=args.windows,
                       progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print(format_table(results))
    print(f"\n{args.windows} windows x 256 tokens, {elapsed:.0f}s")
    print("per-pair settings:\n" + format_plans(results, names=[n for n in results
                                                                 if n.startswith("calib")]
                                                 or None))
    if args.json:
        print(json.dumps(results))
    return 0


def cmd_calibrate(args) -> int:
    from .assets import check_loaders
    check_loaders(plots=bool(args.plots))
    from .calibrate import calibrate
    from .plots import plot_similarity, plot_tradeoff
    model, tok, text = _load(args)
    report = calibrate(model, tok, text, budget_pct=args.budget, n_windows=args.windows,
                       sink=args.sink, top=args.top, progress=not args.no_progress,
                       return_report=True)
    print(report.describe())
    print(f"calibration took {report.seconds:.0f}s")
    print("pair  key cos  value cos  merge cost (% PPL, alone)  setting")
    for s, c in zip(report.similarity, report.pair_costs):
        print(f"{s['pair'][0]:>2},{s['pair'][1]:<2} {s['key_cos']:>+8.3f} {s['value_cos']:>+9.3f}"
              f"  {c['cost_pct']:>+10.2f}                {c['setting']}")
    print(f"setting: the best of the settings grid for the {args.top} cheapest pairs (--top), "
          f"the screening setting for the others")
    if args.out:
        Path(args.out).write_text(report.plan.to_json())
        print(f"wrote the budget plan to {args.out} (use: python -m minitriton eval --plan "
              f"{args.out})")
    if args.plots:
        out = Path(args.plots)
        plot_similarity(report.similarity, out / "similarity.png", costs=report.pair_costs)
        plot_tradeoff({"calibrated (greedy)": [(c, p) for _, c, p in report.curve]},
                      out / "calibration.png", full_ppl=report.full_ppl,
                      budget_pct=report.budget_pct, title="Calibration: adding pairs")
        print(f"wrote {out / 'similarity.png'} and {out / 'calibration.png'}")
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


def _generate(model, tok, prompt: str, cache, max_new_tokens: int):
    from .hf import cache_kwargs
    messages = [{"role": "user", "content": prompt}]
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not hasattr(ids, "shape"):
            ids = ids["input_ids"]
    except (ValueError, AttributeError, TypeError):
        ids = tok(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id, **cache_kwargs(model, cache))
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return text, time.perf_counter() - t0


def cmd_demo(args) -> int:
    from .assets import check_loaders
    check_loaders(plots=True)
    from transformers import DynamicCache

    from .calibrate import shipped_order, shipped_plans, similarity
    from .evaluate import default_configs, evaluate_plans, format_table, prefill, token_windows
    from .hf import MiniCacheHF, use_minitriton_attention
    from .plots import plot_similarity, plot_tradeoff

    model, tok, text = _load(args)
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    shipped = shipped_plans(model)
    plan = shipped.get("calibrated-matched") or MergePlan.paper(L)
    name = "calibrated-matched" if "calibrated-matched" in shipped else "minicache"

    # 1. generation: dense cache beside MiniCache (fused decode attention over merged pairs)
    print(f"prompt: {args.prompt}\n")
    _generate(model, tok, args.prompt, DynamicCache(), 2)       # warm-up, not timed
    dense_text, dense_s = _generate(model, tok, args.prompt, DynamicCache(), args.max_new_tokens)
    use_minitriton_attention(model)
    cache = MiniCacheHF(model.config, plan, window=args.window)
    mini_text, mini_s = _generate(model, tok, args.prompt, cache, args.max_new_tokens)
    print(f"[dense cache, {dense_s:.1f}s]\n{dense_text}\n")
    print(f"[MiniCache {name}, {mini_s:.1f}s, {cache.get_seq_length()} tokens held at "
          f"{cache.compression_ratio:.2f}x, {cache.fused_steps} fused layer-steps (decode "
          f"steps x merged layers); the newest tokens, fewer than W={args.window}, stay "
          f"dense]\n{mini_text}\n")

    # 2. quality on the eval protocol (fewer windows by default) and the trade-off curves
    ids = tok(text).input_ids
    wins = token_windows(ids, args.windows)
    pre = [prefill(model, w.prefix) for w in wins]
    configs = default_configs(L, shipped)
    curves = {"minicache": {}, "minicache-proj": {}, "mean": {}}
    for s in (L - 3, L - 7, L - 11):
        curves["minicache"][f"minicache@{s}"] = MergePlan.paper(L, start=s)
        curves["minicache-proj"][f"proj@{s}"] = MergePlan.paper(L, start=s,
                                                               magnitude="projection")
        curves["mean"][f"mean@{s}"] = MergePlan.paper(L, start=s, method="mean")
    order = shipped_order(model)
    curves["calibrated"] = {f"calibrated@{k}": MergePlan(order[:k], num_layers=L)
                            for k in range(1, len(order) + 1)}
    total = len(configs) + sum(len(c) for c in curves.values())
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total * len(wins), desc="quality", unit="window", leave=False)
    t0 = time.perf_counter()
    results = evaluate_plans(model, wins, configs, window=args.window, bar=bar, prefilled=pre)
    extra = {}
    for group in curves.values():
        extra.update(evaluate_plans(model, wins, group, window=args.window, bar=bar,
                                    prefilled=pre))
    if bar is not None:
        bar.close()
    base = results["full"]["ppl"]
    for r in results.values():
        r["ppl_change_pct"] = 100 * (r["ppl"] / base - 1)
    print(f"quality: {len(wins)} window(s) x 256 tokens ({time.perf_counter() - t0:.0f}s; "
          f"`python -m minitriton eval` runs the full 4 windows)")
    print(format_table(results))
    for n in shipped:
        print(f"{n}: " + "; ".join(shipped[n].describe()))

    # 3. plots
    out = Path(args.out)
    sims = similarity([states for _, states in pre])
    plot_similarity(sims, out / "similarity.png")
    points = {}
    for method, group in curves.items():
        points[method] = [(extra[k]["compression"], extra[k]["ppl"]) for k in group]
        if method in results:
            points[method].append((results[method]["compression"], results[method]["ppl"]))
    plot_tradeoff(points, out / "tradeoff.png", full_ppl=base, budget_pct=3.0)
    mean_key = sum(d["key_cos"] for d in sims) / len(sims)
    mean_val = sum(d["value_cos"] for d in sims) / len(sims)
    print(f"\nadjacent-layer cosine similarity, mean over pairs: keys {mean_key:+.3f}, "
          f"values {mean_val:+.3f}")
    print(f"wrote {out / 'similarity.png'} and {out / 'tradeoff.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # (allow_abbrev=False: demo's --window must not be read as --windows elsewhere)
    p = argparse.ArgumentParser(prog="python -m minitriton", allow_abbrev=False,
                                description="MiniCache on the embedded SmolLM2-135M model "
                                            "(and on a synthetic cache)")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--threads", type=_int_at_least(1), default=None,
                        help="torch CPU threads")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", parents=[common], allow_abbrev=False,
                       help="PPL and compression per config")
    e.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    e.add_argument("--windows", type=_windows(), default=4, help="eval windows (default 4)")
    e.add_argument("--plan", type=_plan_file,
                   help="a plan JSON (from calibrate --out), evaluated as 'custom' (also with "
                        "--configs)")
    e.add_argument("--configs", help="comma-separated subset, e.g. full,minicache")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", parents=[common], allow_abbrev=False,
                       help="choose pairs and per-pair settings")
    c.add_argument("--budget", type=_budget, default=3.0, help="PPL budget, %% over dense (3)")
    from .calibrate import CALIBRATION_START
    c.add_argument("--windows", type=_windows(CALIBRATION_START), default=4,
                   help="calibration windows (4)")
    c.add_argument("--sink", type=_int_at_least(0), default=4,
                   help="dense sink tokens per pair (4)")
    c.add_argument("--top", type=_int_at_least(1), default=DEFAULT_TOP,
                   help=f"cheapest pairs considered ({DEFAULT_TOP})")
    c.add_argument("--out", type=_out_file, help="write the budget plan as JSON")
    c.add_argument("--plots", type=_out_dir,
                   help="folder for similarity.png and calibration.png")
    c.add_argument("--json", action="store_true", help="last stdout line: the report as JSON")
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("demo", parents=[common], allow_abbrev=False,
                       help="generate, compare, plot")
    d.add_argument("--out", type=_out_dir, default="minitriton-demo",
                   help="plots folder (./minitriton-demo)")
    d.add_argument("--windows", type=_windows(), default=1,
                   help="quality windows (1; eval uses 4)")
    d.add_argument("--window", type=_int_at_least(1), default=DEFAULT_WINDOW,
                   help=f"W, decoded tokens merged at once in generation (default "
                        f"{DEFAULT_WINDOW})")
    d.add_argument("--prompt", default="Explain in two sentences why the sky is blue.",
                   help="the question to answer (default: why the sky is blue)")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=48,
                   help="tokens generated with each cache (48)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synthetic", allow_abbrev=False,
                       help="merge a synthetic cache (no model needed)")
    s.add_argument("--shape", type=_shape, default="2,8,2048,128",
                   help="B,H,S,D (2,8,2048,128)")
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="states' dtype (float16)")
    s.add_argument("--t", type=_unit_float, default=0.6, help="SLERP parameter (0.6)")
    s.add_argument("--gamma", type=_unit_float, default=0.05,
                   help="retention threshold (0.05)")
    s.set_defaults(func=cmd_synthetic)
    return p


def cmd_synthetic(args) -> int:
    import torch

    from .synthetic import run
    B, H, S, D = args.shape
    try:
        run(B, H, S, D, dtype=getattr(torch, args.dtype), t=args.t, gamma=args.gamma)
    except RuntimeError as exc:   # (torch's out-of-memory errors are RuntimeErrors)
        if "alloc" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        gib = B * H * S * D * 4 / 2 ** 30
        print(f"minitriton: --shape {B},{H},{S},{D}: the synthetic cache does not fit in memory "
              f"({gib:.3g} GiB per float32 layer, several of them while it is built)",
              file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .assets import AssetMissing
    try:
        return args.func(args)
    except AssetMissing as exc:
        print(f"minitriton: {exc}", file=sys.stderr)
        return 2
