"""Bad input: every public op raises TypeError / ValueError naming the argument, before any
kernel runs, and writes nothing."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import minitriton
from helpers import make_pair


@pytest.fixture
def pair(device):
    return make_pair(1, 2, 5, 32, torch.float32, device)


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_rank(backend, pair):
    xp, xc = pair
    _raises(ValueError, r"x_prev: expected a 4-d tensor, got shape \(2, 5, 32\)",
            minitriton.merge, xp[0], xc[0])
    _raises(ValueError, "x_cur: expected a 4-d", minitriton.merge, xp, xc[None])


def test_shape_mismatch(backend, pair):
    xp, xc = pair
    _raises(ValueError, r"x_cur: shape \(1, 2, 4, 32\) does not match x_prev's",
            minitriton.merge, xp, xc[:, :, :4])


def test_dtype_mismatch(backend, pair):
    xp, xc = pair
    _raises(TypeError, "x_cur: dtype torch.float16 does not match x_prev's torch.float32",
            minitriton.merge, xp, xc.half())


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.bool])
def test_unsupported_dtype(backend, pair, dtype):
    xp, xc = pair
    _raises(TypeError, f"x_prev: dtype {dtype} is not supported", minitriton.merge,
            xp.to(dtype), xc.to(dtype))


def test_device_mismatch(backend, pair):
    xp, xc = pair
    _raises(ValueError, "x_cur: device meta does not match x_prev's", minitriton.merge,
            xp, xc.to("meta"))


def test_meta_tensors(backend, pair):
    """Shape-only tensors are refused by name (after the device agreement checks)."""
    xp, xc = pair
    _raises(ValueError, "x_prev: a tensor on the meta device holds no data", minitriton.merge,
            xp.to("meta"), xc.to("meta"))
    _raises(ValueError, "m.e: a tensor on the meta device holds no data", minitriton.restore,
            minitriton.merge(xp, xc).to("meta"))
    meta = minitriton.merge(xp, xc).to("meta")
    _raises(ValueError, r"pairs\[0\]\.e: a tensor on the meta device holds no data",
            minitriton.MergedPair.cat, [meta, meta])


@pytest.mark.parametrize("D", [8, 15, 257, 512])
def test_head_dim_out_of_range(backend, device, D):
    xp, xc = make_pair(1, 1, 3, D, torch.float32, device)
    _raises(ValueError, f"x_prev: head dim D={D}", minitriton.merge, xp, xc)


def test_too_many_tokens(backend, device):
    """More token pairs than int32 slots can number: refused by name before anything is
    allocated (the inputs here are stride-0 views of one token)."""
    x = torch.zeros(1, 1, 1, 16, device=device).expand(2 ** 16, 2 ** 8, 129, 16)
    _raises(ValueError, r"x_prev: 2164260864 token pairs \(B\*H\*S for shape \(65536, 256, "
            r"129, 16\)\); merge takes at most 2147483647", minitriton.merge, x, x)


@pytest.mark.parametrize("name", ["t", "gamma"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf, math.nextafter(1.0, 2.0),
                                   -5e-324], ids=["-0.1", "1.5", "nan", "inf", "1+ulp", "-tiny"])
def test_t_gamma_range(backend, pair, name, value):
    xp, xc = pair
    _raises(ValueError, f"{name}: expected a value in \\[0, 1\\], got", minitriton.merge,
            xp, xc, **{name: value})


@pytest.mark.parametrize("name", ["t", "gamma"])
@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400, Fraction(10 ** 400, 7)],
                         ids=["1e400", "-1e400", "Fraction(1e400,7)"])
def test_t_gamma_beyond_float_range(backend, pair, name, value):
    xp, xc = pair
    _raises(ValueError, f"{name}: expected a float in \\[0, 1\\], got .* \\(beyond float's "
            "range\\)", minitriton.merge, xp, xc, **{name: value})


@pytest.mark.parametrize("name", ["t", "gamma"])
@pytest.mark.parametrize("value", ["0.5", None, True, [0.5], 0.5j, torch.tensor([0.5, 0.5]),
                                   torch.tensor(True), np.array([0.5, 0.5]), np.array(True),
                                   np.array(0.5j), np.array("0.5")])
def test_t_gamma_type(backend, pair, name, value):
    xp, xc = pair
    _raises(TypeError, f"{name}: expected", minitriton.merge, xp, xc, **{name: value})


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.int64(0),
                                   torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64),
                                   np.array(0.25), np.array([0.25], dtype=np.float32)])
def test_t_gamma_numbers(backend, pair, value):
    """Any real number type is a number: numpy scalars and one-element tensors or arrays
    included."""
    m = minitriton.merge(*pair, t=value, gamma=value)
    want = torch.as_tensor(value).item()
    assert m.t == want and m.gamma == want


def test_inputs_that_require_grad(backend, pair):
    """merge is not differentiable: inputs that require grad are read as data (on both
    backends), the result equals the plain one and nothing in it requires grad."""
    xp, xc = pair
    m = minitriton.merge(xp.clone().requires_grad_(), xc, 0.6, 0.2, "projection")
    ref = minitriton.merge(xp, xc, 0.6, 0.2, "projection")
    for a, b in zip(m.tensors(), ref.tensors()):
        assert torch.equal(a, b) and not a.requires_grad
    assert not any(x.requires_grad for x in minitriton.restore(m))


def test_magnitude_mode(backend, pair):
    xp, xc = pair
    _raises(ValueError, "magnitude: expected one of .* got 'cosine'", minitriton.merge,
            xp, xc, magnitude="cosine")


@pytest.mark.parametrize("bad", [None, [[1.0]], "x"])
def test_non_tensors(backend, pair, bad):
    xp, _ = pair
    _raises(TypeError, "x_cur: expected a torch.Tensor", minitriton.merge, xp, bad)
    _raises(TypeError, "x_prev: expected a torch.Tensor", minitriton.merge, bad, xp)


def test_d_range(backend, pair):
    xp, xc = pair
    _raises(TypeError, "d_range: expected a", minitriton.merge, xp, xc, d_range=torch.zeros(1, 2))
    _raises(ValueError, r"d_range\[0\]: expected shape \(1, 2\)", minitriton.merge, xp, xc,
            d_range=(torch.zeros(2, 2), torch.zeros(1, 2)))
    _raises(TypeError, r"d_range\[1\]: dtype", minitriton.merge, xp, xc,
            d_range=(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.float64)))
    nan = torch.tensor([[0.1, math.nan]], device=xp.device)
    if xp.device.type == "cpu":
        _raises(ValueError, r"d_range\[1\]: expected angular-distance extremes in \[0, 1\] "
                r"\(or -1 for a row with none\), got nan at \(0, 1\)", minitriton.merge, xp, xc,
                d_range=(torch.zeros(1, 2), nan))
        for bad in (math.inf, -math.inf, 1.5, -0.25, 50.0):
            v = torch.tensor([[0.1, bad]])
            _raises(ValueError, r"d_range\[0\]: expected .* \(or 2 for a row with none\), got "
                    f"{bad!r} at \\(0, 1\\)", minitriton.merge, xp, xc, d_range=(v, v))
        # Each end's own marker only: -1 is no d_min, 2 no d_max.
        for i, marker in enumerate((-1.0, 2.0)):
            bad = torch.tensor([[0.1, marker]])
            ok = torch.tensor([[0.1, 0.5]])
            _raises(ValueError, rf"d_range\[{i}\]: expected .* got {marker!r} at \(0, 1\)",
                    minitriton.merge, xp, xc, d_range=(bad, ok) if i == 0 else (ok, bad))
        # A pair's own extremes, those of an empty row included, are taken as they are.
        empty = minitriton.merge(xp[:, :, :0], xc[:, :, :0])
        assert (empty.d_min == 2).all() and (empty.d_max == -1).all()
        m = minitriton.merge(xp, xc, d_range=(empty.d_min, empty.d_max))
        assert torch.equal(m.d_min, minitriton.merge(xp, xc).d_min)
    # Where it is not refused (CUDA), a NaN counts as no earlier extreme.
    from minitriton.kernels.merge import merge_triton
    from minitriton.torch_merge import merge_torch

    run = merge_triton if backend == "triton" else merge_torch
    nans = torch.full((1, 2), math.nan, device=xp.device)
    with_nan = run(xp, xc, 0.6, 0.3, "norm", d_range=(nans, nans))
    alone = run(xp, xc, 0.6, 0.3, "norm")
    for name in ("retained", "d_min", "d_max"):
        assert torch.equal(getattr(with_nan, name), getattr(alone, name)), name


@pytest.mark.parametrize("name,meaning", [
    ("mask", "1 for a token and 0 for padding"),
    ("keep", "1 for a token kept as it is and 0 otherwise")])
def test_token_mask_arguments(backend, pair, name, meaning):
    """mask and keep are checked alike, each with its own name and meaning."""
    xp, xc = pair   # [1, 2, 5, 32]
    dev = xp.device
    _raises(TypeError, f"{name}: expected a .B, S. bool or integer tensor, got list",
            minitriton.merge, xp, xc, **{name: [[1, 1, 1, 1, 1]]})
    for shape, got in (((1, 2, 5), r"\(1, 2, 5\)"), ((5, 1), r"\(5, 1\)"), ((5,), r"\(5,\)")):
        _raises(ValueError, rf"{name}: expected shape \(1, 5\) \(\[B, S\] of x_prev\), got {got}",
                minitriton.merge, xp, xc, **{name: torch.ones(shape, device=dev,
                                                               dtype=torch.bool)})
    for dtype in (torch.float32, torch.float16):
        _raises(TypeError, rf"{name}: dtype {dtype} is not supported \(expected bool or an "
                rf"integer dtype, {meaning}\)", minitriton.merge, xp, xc,
                **{name: torch.ones(1, 5, device=dev, dtype=dtype)})
    _raises(ValueError, f"{name}: device meta does not match", minitriton.merge, xp, xc,
            **{name: torch.ones(1, 5, device="meta", dtype=torch.bool)})
    _raises(TypeError, f"{name}: expected a dense", minitriton.merge, xp, xc,
            **{name: torch.ones(1, 5, dtype=torch.int64, device=dev).to_sparse()})
    if dev.type == "cpu":
        for bad in (2, -1, 3):
            _raises(ValueError, f"{name}: expected {meaning}, got {bad} at " r"\(0, 3\)",
                    minitriton.merge, xp, xc, **{name: torch.tensor([[1, 1, 1, bad, 0]])})


def test_keep(backend, pair):
    xp, xc = pair   # [1, 2, 5, 32]
    m = minitriton.merge(xp, xc, 0.6, 0.0, keep=torch.tensor([[0, 1, 0, 0, 1]], device=xp.device))
    assert m.retained[0, :, 1].all() and m.retained[0, :, 4].all() and m.num_retained == 4


def test_mask(backend, pair):
    xp, xc = pair   # [1, 2, 5, 32]
    dev = xp.device
    # Any integer dtype (unsigned ones included) and strides; the caller's mask is not written.
    for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16):
        m = minitriton.merge(xp, xc, 0.6, 0.5, mask=torch.tensor([[0, 1, 1, 1, 1]], dtype=dtype,
                                                                 device=dev))
        assert not m.retained[0, :, 0].any()
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1], [1, 1]], dtype=torch.int8,
                        device=dev).t()[1:]
    before = mask.clone()
    m = minitriton.merge(xp, xc, 0.6, 0.5, mask=mask)
    assert torch.equal(mask, before) and m.num_retained > 0


def test_restore_layer_name(backend, pair):
    _raises(ValueError, "layer: expected None, .prev. or .cur., got .both.", minitriton.restore,
            minitriton.merge(*pair), layer="both")


@pytest.mark.parametrize("bad", [None, (1, 2), {"e": 1}])
def test_restore_of_non_pair(backend, bad):
    _raises(TypeError, "m: expected a MergedPair", minitriton.restore, bad)


def test_restore_of_inconsistent_pair(backend, pair):
    import dataclasses
    m = minitriton.merge(*pair)
    broken = dataclasses.replace(m, mag_prev=m.mag_prev[:, :, :3])
    _raises(ValueError, r"m.mag_prev: shape \(1, 2, 3\) does not match", minitriton.restore,
            broken)


def test_backend_variable(monkeypatch, pair):
    monkeypatch.setenv("MINITRITON_BACKEND", "cuda")
    _raises(ValueError, "MINITRITON_BACKEND: expected one of", minitriton.merge, *pair)


@pytest.mark.parametrize("variable", [None, "auto", " Auto ", "", "torch", "triton"])
def test_dispatch(monkeypatch, device, variable):
    """Which implementation runs: CUDA tensors the Triton kernels and CPU tensors the torch path
    by default (unset, empty or "auto"); "torch" the torch path everywhere; "triton" the
    kernels everywhere (on a CPU through the interpreter, which the test suite turns on)."""
    from minitriton.backend import interpreter_enabled, select_backend
    if variable is None:
        monkeypatch.delenv("MINITRITON_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MINITRITON_BACKEND", variable)
    auto = variable is None or variable.strip().lower() in ("", "auto")
    cuda = "triton" if auto or variable == "triton" else "torch"
    cpu = "torch" if auto or variable == "torch" else "triton"
    assert select_backend(torch.device("cuda", 0)) == cuda
    if cpu == "triton" and not interpreter_enabled():   # (a GPU run: no interpreter)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            select_backend(torch.device("cpu"))
    else:
        assert select_backend(torch.device("cpu")) == cpu
    # What each public op runs on the test device's tensors (the other implementations are
    # made to fail; on a CPU the suite runs the kernels through the interpreter).
    import minitriton.kernels.decode as decode_kernels
    import minitriton.kernels.merge as merge_kernels
    import minitriton.kernels.restore as restore_kernels
    import minitriton.torch_decode as torch_decode
    import minitriton.torch_merge as torch_path
    runs = cuda if device.type == "cuda" else cpu
    others = ([(merge_kernels, "merge_triton"), (restore_kernels, "restore_triton"),
               (decode_kernels, "decode_attention_triton")] if runs == "torch" else
              [(torch_path, "merge_torch"), (torch_path, "restore_torch"),
               (torch_decode, "decode_attention_torch")])
    for module, name in others:
        def fail(*args, name=name, **kwargs):
            raise AssertionError(f"{name} ran with MINITRITON_BACKEND={variable!r}")
        monkeypatch.setattr(module, name, fail)
    x = torch.randn(1, 2, 5, 16, device=device)
    m = minitriton.merge(x, x.flip(-1))
    assert m.shape == (1, 2, 5, 16)
    assert minitriton.restore(m)[0].shape == (1, 2, 5, 16)
    q = torch.randn(1, 4, 16, device=device)
    assert minitriton.decode_attention(q, m, m, layer="cur").shape == (1, 4, 16)


def test_kernels_launch_on_their_tensors_device():
    """Triton launches on the current CUDA device: the ops make the tensors' device current
    for their launches (a CUDA device object, made without touching CUDA), and nothing on a
    CPU."""
    import contextlib

    from minitriton.backend import on_device
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_device_other_than_the_current_one(monkeypatch):
    """merge, restore and decode on cuda:1 while cuda:0 is current: same results as on cuda:0."""
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    torch.cuda.set_device(0)
    xp, xc = make_pair(2, 2, 37, 64, torch.bfloat16, "cpu", seed=3, outliers=2)
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    out = {}
    for dev in ("cuda:0", "cuda:1"):
        m = minitriton.merge(xp.to(dev), xc.to(dev), 0.6, 0.2)
        out[dev] = (m.e.cpu(), m.retained.cpu(), minitriton.restore(m)[1].cpu(),
                    minitriton.decode_attention(q.to(dev), m, m, layer="cur").cpu())
    assert torch.cuda.current_device() == 0
    for a, b in zip(out["cuda:0"], out["cuda:1"]):
        assert torch.equal(a, b)


def test_triton_on_cpu_without_interpreter(monkeypatch, pair):
    if pair[0].device.type != "cpu":
        pytest.skip("the interpreter requirement applies to CPU tensors")
    monkeypatch.setenv("MINITRITON_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _raises(ValueError, "TRITON_INTERPRET=1", minitriton.merge, *pair)


def test_nothing_written_on_error(backend, pair):
    """The last argument checked is bad: nothing has run, the inputs are untouched."""
    xp, xc = pair
    before = (xp.clone(), xc.clone())
    with pytest.raises(ValueError, match=r"d_range\[1\]: device meta"):
        minitriton.merge(xp, xc, 0.6, 0.05, "projection",
                         d_range=(torch.zeros(1, 2, device=xp.device),
                                  torch.zeros(1, 2, device="meta")))
    assert torch.equal(xp, before[0]) and torch.equal(xc, before[1])


@pytest.mark.parametrize("field,value,exc,match", [
    ("e", lambda m: None, TypeError, "m.e: expected a tensor, got NoneType"),
    ("kept_cur", lambda m: None, TypeError, "m.kept_cur: expected a tensor, got NoneType"),
    ("e", lambda m: m.e.double(), TypeError, "m.e: dtype torch.float64 is not supported"),
    ("e", lambda m: m.e[..., :8], ValueError, "m.e: head dim D=8 is outside"),
    ("slot", lambda m: torch.where(m.slot >= 0, m.slot.amax(), m.slot), ValueError,
     "m.slot: expected each row 0..[0-9]+ of the retained store once"),
    ("mag_prev", lambda m: m.mag_prev.double(), TypeError, "m.mag_prev: expected torch.float32"),
    ("slot", lambda m: m.slot.long(), TypeError, "m.slot: expected torch.int32"),
    ("slot", lambda m: m.slot.abs() + 5, ValueError, "m.slot: expected -1 .* got values from"),
    ("slot", lambda m: torch.full_like(m.slot, -2), ValueError, "m.slot: expected -1 .* from -2"),
    ("slot", lambda m: torch.full_like(m.slot, -1), ValueError, "m.slot: expected -1 .* to -1"),
    ("d_min", lambda m: m.d_min[:, :1], ValueError, r"m.d_min: shape \(1, 1\) does not match"),
    ("kept_cur", lambda m: m.kept_cur[:0], ValueError, "kept_prev .* and kept_cur .* differ"),
    ("slot", lambda m: m.slot.to_sparse(), TypeError,
     "m.slot: expected a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    ("mag_prev", lambda m: m.mag_prev.to_sparse(), TypeError, "m.mag_prev: expected a dense"),
    ("kept_prev", lambda m: m.kept_prev.to_sparse(), TypeError, "m.kept_prev: expected a dense"),
    ("kept_prev", lambda m: m.kept_prev.double(), ValueError,
     r"m.kept_prev: expected \[N, [0-9]+\] torch.float32, got \([0-9]+, [0-9]+\) torch.float64"),
    ("kept_cur", lambda m: m.kept_cur.half(), ValueError, r"m.kept_cur: expected \[N, [0-9]+\]"),
    ("mag_cur", lambda m: m.mag_cur.half(), TypeError, "m.mag_cur: expected torch.float32"),
    ("d_max", lambda m: m.d_max.double(), TypeError, "m.d_max: expected torch.float32"),
    ("mag_cur", lambda m: m.mag_cur.to("meta"), ValueError, "m.mag_cur: device meta does not "
                                                            "match e's"),
    ("kept_prev", lambda m: m.kept_prev.to("meta"), ValueError, "m.kept_prev: device meta"),
    ("t", lambda m: 2.0, ValueError, r"m.t: expected a value in \[0, 1\], got 2.0"),
    ("t", lambda m: "0.6", TypeError, r"m.t: expected a float in \[0, 1\], got str"),
    ("gamma", lambda m: float("nan"), ValueError, r"m.gamma: expected a value in \[0, 1\]"),
    ("magnitude", lambda m: "xx", ValueError, r"m.magnitude: expected one of \('norm', "
                                              r"'projection'\), got 'xx'"),
])
def test_restore_of_malformed_pair(backend, pair, field, value, exc, match):
    import dataclasses
    m = minitriton.merge(*pair, gamma=0.5)
    assert m.num_retained > 1
    if pair[0].device.type != "cpu" and "m.slot:" in match:
        pytest.skip("the slot range is checked on CPU only (on CUDA it would synchronise)")
    _raises(exc, match, minitriton.restore, dataclasses.replace(m, **{field: value(m)}))


def test_cat_checks_each_pair(pair):
    import dataclasses
    xp, xc = pair
    a = minitriton.merge(xp[:, :, :3], xc[:, :, :3], 0.6, 0.5)
    b = minitriton.merge(xp[:, :, 3:], xc[:, :, 3:], 0.6, 0.5)
    assert b.num_retained > 0
    cases = [(dataclasses.replace(b, e=b.e[0]), "pairs\\[1\\].e: expected"),
             (dataclasses.replace(b, slot=None), "pairs\\[1\\].slot: expected a tensor"),
             (dataclasses.replace(b, slot=b.slot.long()), "pairs\\[1\\].slot: expected "
                                                         "torch.int32")]
    if xp.device.type == "cpu":   # slot values are checked on CPU pairs only (no sync)
        cases.append((dataclasses.replace(b, kept_prev=b.kept_prev[:0], kept_cur=b.kept_cur[:0]),
                      "pairs\\[1\\].slot: expected -1"))
    for broken, match in cases:
        with pytest.raises((TypeError, ValueError), match=match):
            minitriton.MergedPair.cat([a, broken])


def test_sparse_and_meta_arguments(backend, pair):
    xp, xc = pair
    _raises(TypeError, "x_prev: expected a dense \\(strided\\) tensor, got layout "
            "torch.sparse_coo", minitriton.merge, xp.cpu().to_sparse(), xc.cpu().to_sparse())
    _raises(ValueError, "t: a tensor on the meta device", minitriton.merge, xp, xc,
            t=torch.tensor(0.5, device="meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (nested tensors are a prototype)
        nested = torch.nested.nested_tensor([xp[0, 0].cpu(), xp[0, 0, :2].cpu()])
    _raises(TypeError, "x_prev: expected a dense \\(strided\\) tensor, got a nested tensor",
            minitriton.merge, nested, nested)


def test_pair_to_arguments(pair):
    m = minitriton.merge(*pair)
    assert m.to(pair[0].device) is m
    _raises(TypeError, "device: expected a torch.device, a device string or an index, got "
            "dtype torch.float16", m.to, torch.float16)
    _raises(TypeError, "device: expected .* got bool True", m.to, True)
    _raises(ValueError, "device: 'gpu0' is not a usable device", m.to, "gpu0")
    if not torch.cuda.is_available():
        _raises(ValueError, "device: cannot move a MergedPair to cuda", m.to, "cuda")


def test_cat_arguments(pair):
    """MergedPair.cat joins only pairs merged alike, and names what differs."""
    xp, xc = pair
    a = minitriton.merge(xp[:, :, :3], xc[:, :, :3], 0.6, 0.3)
    joined = minitriton.MergedPair.cat(p for p in (a, minitriton.merge(xp[:, :, 3:], xc[:, :, 3:],
                                                                       0.6, 0.3)))
    assert joined.shape == xp.shape                         # any iterable of pairs
    for other, match in ((minitriton.merge(xp, xc, 0.1, 0.3), "pairs\\[1\\]: settings t=0.1"),
                         (minitriton.merge(xp, xc, 0.6, 0.9), "gamma=0.9"),
                         (minitriton.merge(xp, xc, 0.6, 0.3, "projection"), "'projection'"),
                         (minitriton.merge(xp.half(), xc.half(), 0.6, 0.3), "dtype")):
        _raises(ValueError, match, minitriton.MergedPair.cat, [a, other])
    _raises(TypeError, "pairs: expected a sequence", minitriton.MergedPair.cat, a)
    _raises(TypeError, "pairs\\[1\\]: expected a MergedPair", minitriton.MergedPair.cat, [a, 1])
    _raises(ValueError, "pairs: expected at least one", minitriton.MergedPair.cat, [])
