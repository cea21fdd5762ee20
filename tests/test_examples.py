"""The `>>>` examples of the docstrings run as written, with the names they take as given (the
states, a query, a model and its tokenizer) bound to small inputs or to the embedded model.

The examples carry no expected output (the values depend on random inputs or on the model), so
each is executed, statement by statement, in one namespace per docstring; a test fails when a
statement raises (a renamed argument, a changed return type) or when a name the example uses is
bound neither by it nor by the test. The examples of `minitriton.evaluate`,
`minitriton.calibrate` and `minitriton.plots` are the command line's own calls (`python -m
minitriton demo` and `calibrate`, minutes on a CPU; the plots take a calibration report) and are
not run here: `EXCLUDED` names them, and a test checks that every other example is collected.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import pkgutil

import pytest
import torch

import minitriton
from minitriton import MergePlan, MiniCache, PairSpec

# Every module of the package but the command line's entry point (those that cannot be
# imported here, e.g. minitriton.hf without transformers, are left out).
MODULES = ["minitriton"] + [m.name for m in pkgutil.walk_packages(minitriton.__path__,
                                                                   "minitriton.")
                            if not m.name.endswith("__main__")]
# Docstrings whose examples need the embedded model and its tokenizer.
NEEDS_MODEL = {"minitriton.hf", "minitriton.hf.track_padding",
               "minitriton.cache.MiniCache.set_attention_mask", "minitriton.assets"}
EXCLUDED = {"minitriton.evaluate", "minitriton.calibrate", "minitriton.plots"}


@functools.lru_cache(maxsize=None)
def _docstrings() -> dict:
    """{docstring name: [example source, ...]} over MODULES (transformers' modules only when
    transformers is installed); collected once."""
    found = {}
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for test in finder.find(module):
            if test.examples:
                found[test.name] = [ex.source for ex in test.examples]
    return found


def _run(examples, namespace: dict) -> dict:
    for source in examples:
        exec(compile(source, "<example>", "exec"), namespace)
    return namespace


def _states(g, *shape):
    return torch.randn(*shape, generator=g)


def _core_namespace() -> dict:
    """Small float32 states: B = 2, H = 2 (4 query heads), S = 24 tokens, D = 64; 30 layers for
    the cache's example, whose layers are correlated as a model's middle layers are."""
    g = torch.Generator().manual_seed(0)
    B, H, S, D = 2, 2, 24, 64
    base = _states(g, B, H, S, D)
    k_states = [0.8 * base + 0.6 * _states(g, B, H, S, D) for _ in range(30)]
    v_states = [0.8 * base + 0.6 * _states(g, B, H, S, D) for _ in range(30)]
    x_prev, x_cur = k_states[15], k_states[16]
    return dict(
        torch=torch, minitriton=minitriton, MergePlan=MergePlan, MiniCache=MiniCache,
        PairSpec=PairSpec, k_states=k_states, v_states=v_states, k_prev=x_prev, k_cur=x_cur,
        v_prev=v_states[15], v_cur=v_states[16], x_prev=x_prev, x_cur=x_cur,
        m=minitriton.merge(x_prev, x_cur), q=_states(g, B, 2 * H, D),
        k_new=_states(g, B, H, 3, D), v_new=_states(g, B, H, 3, D))


CORE = sorted(set(_docstrings()) - NEEDS_MODEL - EXCLUDED)


def test_every_example_is_run_or_excluded_by_name():
    found = set(_docstrings())
    assert {"minitriton.merge.merge", "minitriton.decode.decode_attention",
            "minitriton.cache"} <= found
    assert EXCLUDED <= found, EXCLUDED - found
    pytest.importorskip("transformers")
    assert NEEDS_MODEL <= found, NEEDS_MODEL - found


@pytest.mark.parametrize("name", CORE)
def test_docstring_example_runs(name):
    ns = _run(_docstrings()[name], _core_namespace())
    if name == "minitriton.merge.merge":
        assert ns["k_prev_hat"].shape == ns["k_prev"].shape == (1, 8, 1024, 128)
    if name == "minitriton.cache":
        assert ns["cache"].compression_ratio > 1.0      # the paper's pairs were merged
    if name == "minitriton.decode.decode_attention":
        assert ns["o"].shape == ns["q"].shape


@pytest.fixture(scope="module")
def model_and_tokenizer():
    pytest.importorskip("transformers")
    from minitriton import assets
    if not assets.available():
        pytest.skip(f"embedded model or text not installed: {assets.MODEL_INSTALL}; "
                    f"{assets.TEXT_INSTALL}")
    return assets.load_model()


@pytest.mark.model
def test_model_examples_run(model_and_tokenizer):
    """The transformers integration's examples, on the embedded SmolLM2 model: fused decode,
    padding tracked through a left-padded batch, the mask set by hand, the assets."""
    from minitriton import assets
    from minitriton.hf import MiniCacheHF, cache_kwargs, track_padding

    model, tokenizer = model_and_tokenizer
    found = _docstrings()
    prompts = ["The capital of France is", "Once upon a time, in a land far away,"]
    base = dict(torch=torch, minitriton=minitriton, model=model, tokenizer=tokenizer,
                prompts=prompts, MiniCacheHF=MiniCacheHF, cache_kwargs=cache_kwargs,
                track_padding=track_padding,
                inputs=tokenizer(prompts[:1], return_tensors="pt"))
    with torch.no_grad():
        ns = _run(found["minitriton.hf"], dict(base))
        assert ns["out"].shape[1] > ns["inputs"]["input_ids"].shape[1]
        assert ns["cache"].compression_ratio > 1.0
        ns = _run(found["minitriton.hf.track_padding"], dict(base))
        assert ns["out"].shape[0] == 2
        # (with the tokenizer as track_padding's example left it: padding on the left)
        _run(found["minitriton.cache.MiniCache.set_attention_mask"],
             dict(base, cache=MiniCacheHF(model.config)))
    ns = _run(found["minitriton.assets"],
              dict(base, load_model=assets.load_model, load_text=assets.load_text))
    assert len(ns["ids"]) > 1000
