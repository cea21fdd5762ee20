"""decode_attention rejects bad input with a TypeError or ValueError that names the argument,
before any kernel runs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import DEVICE
from minitriton.decode import decode_attention
from minitriton.pair import MergedPair, _slots_from_mask

B, H, G, S, T, D = 2, 2, 2, 9, 3, 32


def pair(B=B, H=H, S=S, D=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(B, H, S, D, generator=g), dim=-1).to(dtype)
    retained = torch.zeros(B, H, S, dtype=torch.bool)
    retained[:, :, 0] = True
    n = int(retained.sum())
    return MergedPair(e, torch.ones(B, H, S), torch.ones(B, H, S), _slots_from_mask(retained),
                      torch.randn(n, D, generator=g).to(dtype),
                      torch.randn(n, D, generator=g).to(dtype), torch.zeros(B, H),
                      torch.ones(B, H), 0.6, 0.05)


def args(**over):
    a = dict(q=torch.randn(B, H * G, D), k=pair(), v=pair(), layer="cur",
             k_tail=torch.randn(B, H, T, D), v_tail=torch.randn(B, H, T, D),
             seq_lens=torch.full((B,), S, dtype=torch.int32),
             tail_lens=torch.full((B,), T, dtype=torch.int32))
    a.update(over)
    return a


def call(a):
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    return decode_attention(q, k, v, **a)


def on_device(a, device):
    """The arguments on the test device (the `device` fixture): the tests that run the op
    launch the kernels there (CPU tensors need the interpreter, which a GPU run leaves off)."""
    return {name: x.to(device) if isinstance(x, (torch.Tensor, MergedPair)) else x
            for name, x in a.items()}


@pytest.fixture(autouse=True, params=["torch", "triton"])
def _backend(request, monkeypatch):
    monkeypatch.setenv("MINITRITON_BACKEND", request.param)


def test_valid_arguments_run(device):
    o = call(on_device(args(), device))
    assert o.shape == (B, H * G, D)


CASES = {
    # name: (overrides, exception, text the message must contain: the argument and the value)
    "layer": (dict(layer="next"), ValueError, "layer: expected one of ('prev', 'cur'), got 'next'"),
    "layer_type": (dict(layer=1), ValueError, "layer: expected one of ('prev', 'cur'), got 1"),
    "k_not_pair": (dict(k=torch.randn(B, H, S, D)), TypeError,
                   "k: expected a MergedPair (from minitriton.merge), got Tensor"),
    "v_not_pair": (dict(v=(1, 2)), TypeError,
                   "v: expected a MergedPair (from minitriton.merge), got tuple"),
    "q_not_tensor": (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor, got list"),
    "q_rank": (dict(q=torch.randn(B, H * G, 1, D)), ValueError,
               "q: expected a 3-d tensor, got shape (2, 4, 1, 32)"),
    "q_dtype": (dict(q=torch.randn(B, H * G, D, dtype=torch.float64)), TypeError,
                "q: dtype torch.float64 is not supported"),
    "q_int": (dict(q=torch.ones(B, H * G, D, dtype=torch.int32)), TypeError,
              "q: dtype torch.int32 is not supported"),
    "heads": (dict(q=torch.randn(B, 3, D)), ValueError,
              "Hq=3 is not a multiple of the number of KV heads H=2"),
    "no_kv_heads": (dict(q=torch.randn(B, 0, D), k=pair(H=0), v=pair(H=0), k_tail=None,
                         v_tail=None, tail_lens=None), ValueError,
                    "k: a pair of H=0 KV heads has no query groups (q has Hq=0 heads"),
    "head_dim": (dict(q=torch.randn(B, H * G, D + 1)), ValueError,
                 "k: head dim 32 does not match q's head dim 33"),
    "batch": (dict(q=torch.randn(B + 1, H * G, D)), ValueError,
              "k: batch 2 does not match q's batch 3"),
    "kv_shapes": (dict(v=pair(S=S + 1)), ValueError,
                  "v: MergedPair shape (2, 2, 10, 32) does not match k's (2, 2, 9, 32)"),
    "kv_head_dim": (dict(v=pair(D=D * 2)), ValueError, "v: MergedPair shape (2, 2, 9, 64)"),
    "k_dtype": (dict(k=pair(dtype=torch.float16), v=pair(dtype=torch.float16)), TypeError,
                "k: dtype torch.float16 does not match q's torch.float32"),
    "v_dtype": (dict(v=pair(dtype=torch.bfloat16)), TypeError,
                "v: dtype torch.bfloat16 does not match q's torch.float32"),
    "pair_inconsistent": (dict(k=replace(pair(), mag_cur=torch.ones(B, H, S + 1))), ValueError,
                          "k.mag_cur: shape (2, 2, 10) does not match"),
    "tail_k_only": (dict(v_tail=None), ValueError, "k_tail: a tail was given for one of k/v only"),
    "tail_v_only": (dict(k_tail=None), ValueError, "v_tail: a tail was given for one of k/v only"),
    "tail_shapes": (dict(v_tail=torch.randn(B, H, T + 1, D)), ValueError,
                    "v_tail: shape (2, 2, 4, 32) does not match k_tail's (2, 2, 3, 32)"),
    "tail_heads": (dict(k_tail=torch.randn(B, H + 1, T, D), v_tail=torch.randn(B, H + 1, T, D)),
                   ValueError, "k_tail: shape (2, 3, 3, 32) does not match [B=2, H=2, T, D=32]"),
    "tail_rank": (dict(k_tail=torch.randn(B, H, D), v_tail=torch.randn(B, H, D)), ValueError,
                  "k_tail: expected a 4-d tensor, got shape (2, 2, 32)"),
    "tail_dtype": (dict(k_tail=torch.randn(B, H, T, D).half(),
                        v_tail=torch.randn(B, H, T, D).half()), TypeError,
                   "k_tail: dtype torch.float16 does not match q's torch.float32"),
    "tail_v_dtype": (dict(v_tail=torch.randn(B, H, T, D).half()), TypeError,
                     "v_tail: dtype torch.float16 does not match k_tail's torch.float32"),
    "tail_device": (dict(k_tail=torch.randn(B, H, T, D, device="meta"),
                         v_tail=torch.randn(B, H, T, D, device="meta")), ValueError,
                    "k_tail: device meta does not match q's cpu"),
    "seq_lens_high": (dict(seq_lens=torch.tensor([S, S + 1], dtype=torch.int32)), ValueError,
                      "seq_lens: values must lie in [0, S=9], got min 9, max 10"),
    "seq_lens_negative": (dict(seq_lens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError,
                          "seq_lens: values must lie in [0, S=9], got min -1, max 0"),
    "seq_lens_dtype": (dict(seq_lens=torch.tensor([S, S])), TypeError,
                       "seq_lens: expected dtype int32, got torch.int64"),
    "seq_lens_shape": (dict(seq_lens=torch.tensor([S], dtype=torch.int32)), ValueError,
                       "seq_lens: expected shape (2,), got (1,)"),
    "seq_lens_list": (dict(seq_lens=[S, S]), TypeError,
                      "seq_lens: expected an int32 torch.Tensor of shape [2], got list"),
    "seq_lens_device": (dict(seq_lens=torch.full((B,), S, dtype=torch.int32, device="meta")),
                        ValueError, "seq_lens: device meta does not match q's cpu"),
    "seq_starts_high": (dict(seq_starts=torch.tensor([0, S + 1], dtype=torch.int32)),
                        ValueError, "seq_starts: values must lie in [0, S=9], got min 0, max 10"),
    "seq_starts_negative": (dict(seq_starts=torch.tensor([-3, 0], dtype=torch.int32)),
                            ValueError, "seq_starts: values must lie in [0, S=9], got min -3"),
    "seq_starts_dtype": (dict(seq_starts=torch.tensor([0, 1])), TypeError,
                         "seq_starts: expected dtype int32, got torch.int64"),
    "seq_starts_shape": (dict(seq_starts=torch.zeros(2, 1, dtype=torch.int32)), ValueError,
                         "seq_starts: expected shape (2,), got (2, 1)"),
    "seq_starts_device": (dict(seq_starts=torch.zeros(B, dtype=torch.int32, device="meta")),
                          ValueError, "seq_starts: device meta does not match q's cpu"),
    "tail_lens_high": (dict(tail_lens=torch.tensor([T + 1, 0], dtype=torch.int32)), ValueError,
                       "tail_lens: values must lie in [0, T=3], got min 0, max 4"),
    "tail_lens_negative": (dict(tail_lens=torch.tensor([0, -2], dtype=torch.int32)),
                           ValueError, "tail_lens: values must lie in [0, T=3], got min -2, max 0"),
    "tail_lens_dtype": (dict(tail_lens=torch.tensor([1.0, 1.0])), TypeError,
                        "tail_lens: expected dtype int32, got torch.float32"),
    "tail_lens_without_tail": (dict(k_tail=None, v_tail=None), ValueError,
                               "tail_lens: given without k_tail/v_tail"),
    "sm_scale_type": (dict(sm_scale="0.1"), TypeError, "sm_scale: expected a float, got str '0.1'"),
    "sm_scale_nan": (dict(sm_scale=float("nan")), ValueError,
                     "sm_scale: expected a finite float32 number, got nan"),
    "sm_scale_huge": (dict(sm_scale=1e300), ValueError,
                      "sm_scale: expected a finite float32 number, got 1e+300"),
    "sm_scale_meta": (dict(sm_scale=torch.tensor(0.5, device="meta")), ValueError,
                      "sm_scale: a tensor on the meta device holds no data"),
    "return_lse": (dict(return_lse=1), TypeError, "return_lse: expected a bool, got int"),
    "num_splits_zero": (dict(num_splits=0), ValueError,
                        "num_splits: expected a value in [1, 1024], got 0"),
    "num_splits_huge": (dict(num_splits=10 ** 6), ValueError,
                        "num_splits: expected a value in [1, 1024], got 1000000"),
    "num_splits_float": (dict(num_splits=2.0), TypeError,
                         "num_splits: expected an int or None, got float"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises(name):
    over, exc, text = CASES[name]
    a = args(**over)
    with pytest.raises(exc, match=None) as info:
        call(a)
    assert text in str(info.value), f"{name}: {info.value!s} does not mention {text!r}"


def test_numpy_flags_and_counts(device):
    """return_lse and num_splits take numpy bools and integers, as the other arguments do."""
    a = on_device(args(), device)
    want_o, want_lse = call(dict(a, return_lse=True, num_splits=2))
    o, lse = call(dict(a, return_lse=np.bool_(True), num_splits=np.int64(2)))
    assert torch.equal(o, want_o) and torch.equal(lse, want_lse)


def test_sm_scale_number_types(device):
    """Any real number is a scale: numpy scalars and one-element tensors give the float's
    result."""
    import numpy as np

    a = on_device(args(), device)
    want = call(dict(a, sm_scale=0.25))
    for scale in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor([0.25])):
        assert torch.equal(call(dict(a, sm_scale=scale)), want)
    with pytest.raises(TypeError, match="sm_scale"):
        call(dict(a, sm_scale=torch.tensor([0.25, 0.5])))
    with pytest.raises(ValueError, match="sm_scale: .* \\(beyond float's range\\)"):
        call(dict(a, sm_scale=10 ** 400))


def test_device_mismatch_of_pair():
    k = pair()
    k_meta = MergedPair(*(x.to("meta") for x in k.tensors()), k.t, k.gamma, k.magnitude)
    with pytest.raises(ValueError, match="k: device"):
        call(args(k=k_meta))


def test_meta_tensors():
    meta = MergedPair(*(x.to("meta") for x in pair().tensors()), 0.6, 0.05)
    with pytest.raises(ValueError, match="q: a tensor on the meta device holds no data"):
        call(args(q=torch.randn(B, H * G, D, device="meta"), k=meta, v=meta))


def test_not_differentiable(device):
    """q (or a tail) that requires grad is read as data: same output, which requires no grad."""
    a = on_device(args(), device)
    want = call(dict(a))
    o = call(dict(a, q=a["q"].clone().requires_grad_(),
                  k_tail=a["k_tail"].clone().requires_grad_()))
    assert torch.equal(o, want) and not o.requires_grad


def test_interpreter_version_gate(monkeypatch):
    """Triton's interpreter before 3.7 cannot run decode's loops under numpy 2.4: named, not a
    failure deep in the interpreter."""
    import numpy
    import triton

    import minitriton
    from minitriton.kernels import decode as kdecode
    if DEVICE != "cpu":
        pytest.skip("the interpreter is switched on before triton is imported (CPU runs only)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    x = torch.randn(1, 2, 8, 16)
    m = minitriton.merge(x, 0.9 * x + 0.1 * torch.randn_like(x))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"triton >= 3.7 or numpy < 2.4 .*triton 3.6.0"):
        decode_attention(torch.randn(1, 4, 16), m, m, layer="prev")
    for tv, nv in (("3.6.0", "2.3.5"), ("3.7.1", "2.4.1")):
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        kdecode._check_interpreter_loops()
