"""The eval protocol and the calibration search, on a tiny randomly initialised Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from helpers import tiny_llama  # noqa: E402

from minitriton.cache import MergePlan  # noqa: E402
from minitriton.calibrate import calibrate, similarity  # noqa: E402
from minitriton.cli import build_parser  # noqa: E402
from minitriton.evaluate import (DEFAULT_CONFIGS, default_configs, evaluate,  # noqa: E402
                                 format_table, score_window, token_windows)
from minitriton.hf import MiniCacheHF, cache_kwargs  # noqa: E402

L = 4


@pytest.fixture(scope="module")
def model():
    yield from tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=1024)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (5000,), generator=g).tolist()


def test_token_windows(ids):
    wins = token_windows(ids, 4)
    assert [w.prefix.shape for w in wins] == [(1, 512)] * 4
    assert wins[1].prefix[0, 0].item() == ids[768]
    assert wins[3].continuation[0].tolist() == ids[768 * 3 + 512:768 * 3 + 768]
    with pytest.raises(ValueError, match="n_windows"):
        token_windows(ids[:1000], 2)


def test_replayed_prefill_equals_prefilling_through_the_cache(model, ids):
    """One prefill per window serves every config: identical NLL and bytes."""
    win = token_windows(ids, 1)[0]
    plan = MergePlan.paper(L, magnitude="projection", sink=2)
    cache = MiniCacheHF(model.config, plan, window=8)
    with torch.no_grad():
        first = model(input_ids=win.prefix, **cache_kwargs(model, cache)).logits[0, -1:]
        nbytes = cache.nbytes
        rest = model(input_ids=win.continuation[:, :-1], **cache_kwargs(model, cache)).logits[0]
    nll = float(torch.nn.functional.cross_entropy(torch.cat([first, rest]),
                                                  win.continuation[0], reduction="sum"))
    r = score_window(model, win, plan, window=8)
    assert r["nll"] == pytest.approx(nll, rel=1e-6) and r["nbytes"] == nbytes
    assert r["tokens"] == 256 and r["dense_nbytes"] > nbytes


def test_evaluate_is_deterministic_and_reports_every_config(model, ids):
    configs = default_configs(L)
    assert list(configs) == ["full", "minicache", "minicache-proj", "mean"]
    a = evaluate(model, None, "", configs, n_windows=2, ids=ids, progress=False)
    b = evaluate(model, None, "", configs, n_windows=2, ids=ids, progress=False)
    for name in configs:
        assert a[name]["ppl"] == b[name]["ppl"] and a[name]["nbytes"] == b[name]["nbytes"]
    assert a["full"]["compression"] == 1.0 and a["full"]["ppl_change_pct"] == 0.0
    assert a["minicache"]["compression"] > 1.0 and a["mean"]["compression"] > 1.0
    assert a["minicache"]["pairs"] == ["(2,3) slerp t=0.60 gamma=0.05 norm sink=0"]
    table = format_table(a)
    assert all(name in table for name in configs)
    json.loads(json.dumps(a))            # what `eval --json` prints


def test_calibrate_returns_a_plan_within_budget(model, ids):
    report = calibrate(model, None, ids=ids, start=512, n_windows=1, top=3, budget_pct=50.0,
                       progress=False, return_report=True)
    assert isinstance(report.plan, MergePlan)
    assert len(report.pair_costs) == L - 1 and len(report.similarity) == L - 1
    assert all(-1.0 <= s["key_cos"] <= 1.0 for s in report.similarity)
    n, compression, ppl = report.curve[len(report.plan)]
    assert n == len(report.plan) and ppl <= report.full_ppl * 1.5
    for spec in report.plan:
        assert spec.sink == 4 and spec.method == "slerp"
    assert math.isfinite(report.seconds)
    json.loads(json.dumps(report.to_dict()))


def test_models_with_shared_layers_evaluate_and_calibrate(ids):
    """A model whose last layers reuse earlier layers' states (Gemma 3n, num_kv_shared_layers)
    never updates them: evaluate's default plans and calibrate's pairs stay below them, and the
    prefill hands the cache no states for them."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(0)
    cfg = Gemma3nTextConfig(hidden_size=32, hidden_size_per_layer_input=8, num_hidden_layers=8,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            intermediate_size=64, vocab_size=64, vocab_size_per_layer_input=64,
                            num_kv_shared_layers=4, layer_types=["full_attention"] * 8,
                            laurel_rank=4, altup_num_inputs=2, max_position_embeddings=1024,
                            activation_sparsity_pattern=[0.0] * 8)
    cfg._attn_implementation = "sdpa"
    gemma = Gemma3nForCausalLM(cfg).eval()
    configs = default_configs(8, updating=4)
    assert [s.layers for s in configs["minicache"]] == [(2, 3)]
    assert [s.layers for s in configs["mean"]] == [(2, 3)]
    with pytest.raises(ValueError, match="updating: expected at most num_layers=8, got 9"):
        default_configs(8, updating=9)
    r = evaluate(gemma, None, "", n_windows=1, ids=ids, progress=False)
    assert list(r) == list(DEFAULT_CONFIGS)
    assert r["minicache"]["pairs"] == ["(2,3) slerp t=0.60 gamma=0.05 norm sink=0"]
    assert r["full"]["compression"] == 1.0 and r["minicache"]["compression"] > 1.0
    assert all(math.isfinite(x["ppl"]) for x in r.values())
    report = calibrate(gemma, None, ids=ids, start=512, n_windows=1, top=2, budget_pct=50.0,
                       progress=False, return_report=True)
    assert [c["pair"][0] for c in report.pair_costs] == [0, 1, 2]
    assert [s["pair"] for s in report.similarity] == [(0, 1), (1, 2), (2, 3)]
    assert all(s.cur < 4 for s in report.order)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(budget_pct=-1), ValueError, "budget_pct: expected a percentage > 0, got -1.0"),
    (dict(budget_pct=float("nan")), ValueError, "budget_pct: expected a percentage > 0"),
    (dict(budget_pct="3"), TypeError, "budget_pct: expected a percentage > 0, got str"),
    (dict(top=0), ValueError, "top: expected an int >= 1, got 0"),
    (dict(top=2.5), TypeError, "top: expected an int >= 1, got float"),
    (dict(start=-5), ValueError, "start: expected an int >= 0, got -5"),
    (dict(start=5000), ValueError, "start: window 0, from token 5000, needs tokens up to"),
    (dict(n_windows=9), ValueError, "n_windows: window 2 needs tokens up to 2304, the text "
                                    "has 2000"),
    (dict(sink=-1), ValueError, "sink: expected an int >= 0, got -1"),
    (dict(gamma=2), ValueError, "gamma: expected a value in [0, 1], got 2.0"),
    (dict(window=0), ValueError, "window: expected an int >= 1, got 0"),
    (dict(match_compression=0.5), ValueError, "match_compression: expected a compression "
                                              "ratio >= 1, got 0.5"),
    (dict(progress="no"), TypeError, "progress: expected a bool, got str"),
    (dict(ids=None, text="Hi"), TypeError, "tokenizer: expected a tokenizer to encode the "
                                           "text (or pass ids), got NoneType"),
    (dict(ids=None, text=3), TypeError, "text: expected a str, got int"),
    (dict(ids=[0.5, 1.5]), TypeError, "ids: expected integer token ids, got dtype"),
    (dict(ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "ids: expected a [N] (or "
                                                                "[1, N]) sequence"),
    (dict(ids=["a", "b"]), TypeError, "ids: expected token ids (a sequence or tensor of ints)"),
    (dict(ids=[]), ValueError, "ids: expected token ids, got none"),
    (dict(ids=list(range(500))), ValueError, "text: 500 tokens, too few for one window (768 "
                                             "tokens from token 0)"),
    (dict(ids=list(range(900)), start=200), ValueError, "start: window 0, from token 200, "
                                                        "needs tokens up to 968, the text has 900"),
])
def test_calibrate_checks_its_arguments_before_any_work(kwargs, error, message):
    kwargs = {"ids": list(range(2000)), "start": 0, "n_windows": 1, "progress": False, **kwargs}
    with pytest.raises(error) as info:
        calibrate(None, None, **kwargs)     # (no model is touched before the checks)
    assert message in str(info.value)


def test_similarity_of_identical_layers_is_one():
    k = torch.randn(1, 2, 5, 16)
    sims = similarity([[(k, k), (2 * k, k), (-k, k)]])
    assert sims[0]["key_cos"] == pytest.approx(1.0) and sims[0]["key_dist"] < 1e-3
    assert sims[1]["key_cos"] == pytest.approx(-1.0) and sims[1]["value_cos"] == pytest.approx(1)


def test_cli_parser(tmp_path, monkeypatch):
    args = build_parser().parse_args(["eval", "--json", "--windows", "2"])
    assert args.json and args.windows == 2 and args.func.__name__ == "cmd_eval"
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["demo"])
    assert args.out == "minitriton-demo"
    # The output folders are checked by making them, and what the check made is removed.
    args = build_parser().parse_args(["calibrate", "--plots", str(tmp_path / "a" / "b")])
    (tmp_path / "c").mkdir()
    build_parser().parse_args(["demo", "--out", str(tmp_path / "c")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert not any((tmp_path / "c").iterdir())


@pytest.mark.parametrize("argv,message", [
    (["synthetic", "--gamma", "2"], "--gamma: expected a number in [0, 1], got 2.0"),
    (["synthetic", "--t", "nan"], "--t: expected a number in [0, 1], got nan"),
    (["synthetic", "--shape", "1,4,256,8"], "head dim D=8 is outside"),
    (["synthetic", "--shape", "1,4,256"], "expected B,H,S,D"),
    (["eval", "--windows", "0"], "--windows: expected an int in [1, 98] (windows of the "
                                 "embedded text), got 0"),
    (["eval", "--windows", "99"], "--windows: expected an int in [1, 98]"),
    (["demo", "--windows", "1000"], "--windows: expected an int in [1, 98]"),
    (["calibrate", "--windows", "95"], "--windows: expected an int in [1, 94]"),
    (["demo", "--window", "x"], "--window: expected an int >= 1, got 'x'"),
    (["eval", "--window", "4"], "unrecognized arguments: --window 4"),     # (no effect there)
    (["calibrate", "--out", "/nonexistent/dir/plan.json"], "--out: the folder of "),
    (["calibrate", "--out", "/"], "--out: '/' is a folder; expected a file path"),
    (["calibrate", "--plots", __file__], f"--plots: {__file__!r} is a file"),
    (["demo", "--out", __file__], f"--out: {__file__!r} is a file"),
    (["demo", "--out", f"{__file__}/plots"], f"--out: cannot create the folder "
                                              f"{__file__ + '/plots'!r} or a file in it (Not a "
                                              f"directory)"),
    (["calibrate", "--plots", f"{__file__}/x/y"], "--plots: cannot create the folder "),
    (["calibrate", "--budget", "-1"], "--budget: expected a percentage > 0"),
    (["calibrate", "--sink", "-2"], "--sink: expected an int >= 0"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens: expected an int >= 1"),
    (["eval", "--plan", "/nonexistent/plan.json"], "--plan: cannot read '/nonexistent/plan"),
])
def test_cli_rejects_bad_values_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_evaluates_a_given_plan_with_any_configs(model, tmp_path):
    from types import SimpleNamespace

    from minitriton.cli import _configs

    path = tmp_path / "plan.json"
    path.write_text(MergePlan([(1, 2)]).to_json())
    args = build_parser().parse_args(["eval", "--plan", str(path), "--configs", "full,minicache"])
    assert list(_configs(model, args)) == ["full", "minicache", "custom"]
    args = build_parser().parse_args(["eval", "--configs", "mean"])   # (full: the baseline)
    assert list(_configs(model, args)) == ["full", "mean"]
    path.write_text('{"pair": [[1, 2]]}')
    with pytest.raises(SystemExit):         # (argparse: usage and message, before any work)
        build_parser().parse_args(["eval", "--plan", str(path)])
    assert list(_configs(model, SimpleNamespace(plan=None, configs=None)))[0] == "full"
    with pytest.raises(SystemExit, match="'custom' is the plan given by --plan"):
        _configs(model, SimpleNamespace(plan=None, configs="full,custom"))
    with pytest.raises(SystemExit, match=f"--plan: not a plan for this {L}-layer model"):
        _configs(model, SimpleNamespace(plan=f"[[{L}, {L + 1}]]", configs=None))


def test_cli_checks_config_names_before_loading_the_model(monkeypatch, tmp_path):
    from minitriton import cli
    from minitriton.calibrate import SHIPPED_PLANS
    from minitriton.evaluate import DEFAULT_CONFIGS

    class Loaded(Exception):
        pass

    def load(args):
        raise Loaded

    monkeypatch.setattr(cli, "_load", load)
    with pytest.raises(SystemExit, match=r"unknown \['bogus'\]"):
        cli.main(["eval", "--configs", "full,bogus"])
    with pytest.raises(SystemExit, match=r"unknown \[''\]"):     # (not "every config")
        cli.main(["eval", "--configs", ""])
    with pytest.raises(SystemExit, match="'custom' is the plan given by --plan"):
        cli.main(["eval", "--configs", "custom"])
    with pytest.raises(Loaded):   # every name the embedded model's eval knows gets through
        cli.main(["eval", "--configs", ",".join((*DEFAULT_CONFIGS, *SHIPPED_PLANS))])
    plan = tmp_path / "plan.json"
    plan.write_text("[[40, 41]]")                 # a valid plan, not for a 30-layer model
    with pytest.raises(SystemExit, match="--plan: not a plan for this 30-layer model: pair "
                                         r"\(40, 41\): layer 41 is out of range"):
        cli.main(["eval", "--plan", str(plan)])
    plan.write_text("[[28, 29]]")
    with pytest.raises(Loaded):
        cli.main(["eval", "--plan", str(plan)])
    assert SHIPPED_PLANS == ("calibrated", "calibrated-matched")
    assert tuple(default_configs(L)) == DEFAULT_CONFIGS


def test_calibrate_defaults_match_the_command():
    import inspect

    args = build_parser().parse_args(["calibrate"])
    params = inspect.signature(calibrate).parameters
    for name in ("top", "sink"):
        assert params[name].default == getattr(args, name), name
    assert params["budget_pct"].default == args.budget and params["n_windows"].default == \
        args.windows


def test_windows_argument():
    from minitriton.evaluate import token_windows

    ids = torch.arange(2000)
    assert len(token_windows(ids, 2)) == 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_windows: expected at least 1"):
            token_windows(ids, bad)
    with pytest.raises(TypeError, match="n_windows"):
        token_windows(ids, 2.0)


@pytest.mark.parametrize("progress", [True, False])
def test_load_model_progress(monkeypatch, progress):
    """`load_model(progress=False)` (the CLI's --no-progress) silences transformers' bar over
    the GGUF tensors while the model loads, and leaves that module as it was."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from minitriton import assets

    seen = []

    def fake_model(*args, **kwargs):   # what the GGUF conversion does with its bar
        seen.append(gguf_utils.tqdm([1, 2]).disable)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: "tok")
    monkeypatch.setattr(assets, "check_loaders", lambda: None)
    monkeypatch.setattr(assets, "model_path", lambda: __import__("pathlib").Path("/m/x.gguf"))
    before = gguf_utils.tqdm
    model, tok = assets.load_model(progress=progress)
    assert seen == [not progress] and tok == "tok" and not model.training
    assert gguf_utils.tqdm is before


@pytest.mark.parametrize("argv", [["demo", "--windows", "1"],
                                  ["calibrate", "--windows", "1", "--plots", "PLOTS"]])
def test_commands_that_plot_name_matplotlib_before_any_work(argv, monkeypatch, tmp_path,
                                                            capsys):
    """Without matplotlib, `demo` and `calibrate --plots` stop at once with the install
    command (exit 2), before the model loads."""
    import importlib.util

    from minitriton import assets
    from minitriton.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(assets, "load_model", no_loading)
    argv = [str(tmp_path / "plots") if a == "PLOTS" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "minitriton: plotting needs matplotlib: install minitriton's demo extra" in err
    assert "pip install -e '.[demo]'" in err


def test_synthetic_command(capsys):
    """`python -m minitriton synthetic`: a table row per magnitude mode; a shape that cannot be
    allocated is a message and exit 2, not a traceback."""
    from minitriton.cli import main

    assert main(["synthetic", "--shape", "1,2,64,32", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("norm", "projection"))]
    assert [r[0] for r in rows] == ["norm", "projection"]
    for r in rows:
        assert float(r[1].rstrip("x")) > 1.0 and 0.0 <= float(r[3]) < 1.0
    assert "the median of 5 calls after a warm-up one" in out
    # (1 PiB a layer: beyond any address space, so refused even where memory is overcommitted)
    assert main(["synthetic", "--shape", "4096,4096,65536,256"]) == 2
    assert "does not fit in memory (1.05e+06 GiB per float32 layer" in capsys.readouterr().err
