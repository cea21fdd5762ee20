"""Compile every Triton kernel in every config ahead of time for real GPUs (sm_80 and sm_90),
without a GPU, and read each cubin's registers, shared memory and spills.

    python tests/aot_compile.py [--jobs N] [--cc 80 90] [--only REGEX] [--plain]

Prints one line per (kernel, config, target): registers, shared memory, spill bytes and stack
frame, from `ptxas -v` run on the build's PTX as Triton runs it for that target (its ptxas and
flags, recorded from one compile; see `_triton_ptxas_argv`); exits 1 on a compile failure, or
on a spill with the tritons in SPILL_FREE (3.5, 3.6, 3.9; other versions print their spills).
A spill that ptxas chooses (fewer registers than the block allows, for occupancy) is printed
as "spills by choice" and is not a failure when the same build, told the block's register
budget (`maxnreg`), compiles without any (the kernel does not force it) and it is at most
BY_CHOICE_MAX_BYTES. A typical build without its specialised twin (no launch of its variant
captured) exits 1 too. Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit
functions). Used by tests/test_aot.py.

Each config but decode's WIDE_D ones is compiled twice (where `specialisation_supported`).
First as a build that any launch may get: every integer argument a plain i32/i64, no pointer
alignment assumed. Then (names ending in "+spec") as the build a GPU compiles for typical
inputs: Triton's JIT specialises each launch on its arguments (a pointer aligned to 16 bytes,
an integer that is a multiple of 16, or 1, which becomes a constant; not the token counts and
split sizes the kernels list in `do_not_specialize`), and these builds take the specialisation
from real launches (`capture_launches`: each op run once under the interpreter on contiguous
inputs with a head dim of 128, the arguments specialised as the JIT does for a CUDA target).
The specialised builds load and store along D in 16-byte vectors; their registers differ from
the plain builds'.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

# Triton's default (FP contraction on), stated so that triton 3.9 does not warn that it will
# change; the kernels are checked as users' GPUs compile them today.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# The (major, minor) tritons whose compilers build every config without a forced spill: 3.5,
# 3.6 and 3.9. The others compile every config too, with spills in some of them (README,
# Versions), which are printed but not a failure.
SPILL_FREE = {(3, 5), (3, 6), (3, 9)}
# Builds whose spills are printed but never a failure: decode's WIDE_D (int64 offsets along D
# for e and the retained rows), which only a hand-built view of a pair with a D stride above
# 2^31 / (D - 1) launches.
SPILLS_TOLERATED = re.compile(r"_wideD$")
# A spill ptxas chooses (the build compiles without any when told the block's register
# budget) is printed but not a failure up to this many bytes (stores and loads): ptxas trades
# a few bytes of local memory for occupancy (8-40 seen with triton 3.6 and 3.9); more would
# cost a launch more than it gains, and fails.
BY_CHOICE_MAX_BYTES = 64


def spills_checked() -> bool:
    """True when this triton is one of SPILL_FREE (a spill is then a failure)."""
    import triton

    from minitriton.kernels.common import version
    return version(triton.__version__) in SPILL_FREE


KERNEL_MODULES = ["minitriton.kernels.merge", "minitriton.kernels.restore",
                  "minitriton.kernels.decode"]
# Builds left out of the specialised set: decode's WIDE_D, for hand-built views only.
NOT_TYPICAL = SPILLS_TOLERATED


def plain_specs():
    """(name, jit_fn, signature, constexprs, num_warps, num_stages) of every kernel config."""
    specs = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        specs.extend(mod.aot_specs())
    return specs


_LAUNCHES = None   # the captured launches (set in each process by `_use_launches`)
_SPECS = None      # all_specs() for them, built once per process


def _use_launches(launches) -> None:
    global _LAUNCHES, _SPECS
    _LAUNCHES, _SPECS = launches, None


def all_specs():
    """The plain specs, then their specialised builds (when launches were captured): each
    spec has a 7th item, the attributes (`{(arg index,): [["tt.divisibility", 16]]}`). Built
    once per process and set of launches (each compile job looks its spec up by index)."""
    global _SPECS
    if _SPECS is None:
        specs = [(*s, {}) for s in plain_specs()]
        if _LAUNCHES:
            specs += [x for s in specs if (x := specialise(s, _LAUNCHES)) is not None]
        _SPECS = specs
    return _SPECS


def capture_launches() -> list:
    """How Triton's JIT specialises the kernels' launches on typical inputs, for a CUDA target:
    [(kernel name, {argument: [type, key]}, {constexpr argument: value})], key "D" for a
    pointer aligned to 16 bytes or an integer divisible by 16, type "constexpr" for an
    integer equal to 1 (arguments a kernel lists in `do_not_specialize`, such as token counts,
    are not specialised, as in the JIT). Runs merge (plain; with a padding mask, kept tokens,
    both; projection), restore (both layers; each) and decode (with and without a tail and
    row starts) once through the kernels under the interpreter (TRITON_INTERPRET=1 and
    MINITRITON_BACKEND=triton must be set), on contiguous bfloat16 and float32 inputs:
    B = 1, H = 4 (4 query heads per KV head for decode), S = 48 tokens, D = 128, a tail of 16
    tokens."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction

    import minitriton

    records = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        # As the JIT: the arguments the kernel lists in do_not_specialize (names or indices)
        # are not specialised on their value (divisible by 16, equal to 1), those in
        # do_not_specialize_on_alignment not on it.
        fixed, unaligned = ({self.arg_names[i] if isinstance(i, int) else i
                             for i in self.kwargs.get(key) or ()}
                            for key in ("do_not_specialize", "do_not_specialize_on_alignment"))
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        spec, consts = {}, {}
        for name, value in bound.items():
            if "constexpr" in str(params[name].annotation):
                consts[name] = value
            elif value is None:
                spec[name] = ["constexpr", None]
            elif isinstance(value, (torch.Tensor, int)) and not isinstance(value, bool):
                ty, key = native_specialize_impl(CUDABackend, value, False, name not in fixed,
                                                 name not in unaligned)
                spec[name] = [ty, key]
        records.append((self.fn.__name__, spec, consts))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        g = torch.Generator().manual_seed(0)
        B, H, S, D, G, T = 1, 4, 48, 128, 4, 16
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[:, :5] = False
        keep = torch.zeros(B, S, dtype=torch.bool)
        keep[:, :4] = True
        starts = torch.tensor([3], dtype=torch.int32)
        for dtype in (torch.bfloat16, torch.float32):   # (the range rule: half dtypes only)
            x = [torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(2)]
            m = minitriton.merge(*x, 0.6, 0.3)
            for kw in (dict(mask=mask), dict(keep=keep), dict(mask=mask, keep=keep)):
                minitriton.merge(*x, 0.6, 0.3, **kw)
            minitriton.merge(*x, 0.6, 0.3, "projection")
            for layer in (None, "prev", "cur"):
                minitriton.restore(m, layer=layer)
            q = torch.randn(B, H * G, D, generator=g).to(dtype)
            tail = torch.randn(B, H, T, D, generator=g).to(dtype)
            for kw in ({}, dict(k_tail=tail, v_tail=tail), dict(seq_starts=starts),
                       dict(k_tail=tail, v_tail=tail, seq_starts=starts)):
                minitriton.decode_attention(q, m, m, layer="cur", **kw)
    finally:
        InterpretedFunction.run = original
    return records


def specialise(spec, launches):
    """The build of `spec` that the JIT compiles for the captured launch of its kernel with the
    same boolean constexprs (the variant: tail, row starts, mask, ...) and the most pointer
    types and other constexprs in common (an absent mask is a placeholder pointer of another
    type), or None (none captured, or a build in NOT_TYPICAL). The spec's own pointer
    types and constexprs stay; the launch gives the integers' types, the alignment and
    divisibility attributes, and the integers equal to 1."""
    from triton.backends.nvidia.compiler import CUDABackend

    name, fn, sig, consts, num_warps, num_stages, _ = spec
    if NOT_TYPICAL.search(name):
        return None
    pointers = [a for a, ty in sig.items() if ty.startswith("*")]
    best, score = None, -1
    for kernel, args, launch_consts in launches:
        if kernel != fn.__name__ or any(isinstance(v, bool) and launch_consts.get(k) != v
                                        for k, v in consts.items()):
            continue
        n = (sum(args.get(a, [None])[0] == sig[a] for a in pointers)
             + sum(launch_consts.get(k) == v for k, v in consts.items()))
        if n > score:
            best, score = args, n
    if best is None:
        return None
    sig, consts, attrs = dict(sig), dict(consts), {}
    for a, (ty, key) in best.items():
        if sig.get(a, "constexpr") == "constexpr":
            continue
        if ty == "constexpr":        # an integer equal to 1 (or None)
            sig[a], consts[a] = "constexpr", key
            continue
        if not sig[a].startswith("*"):
            sig[a] = ty
        attr = CUDABackend.parse_attr(key or "")
        if attr:
            attrs[(fn.arg_names.index(a),)] = attr
    return f"{name}+spec", fn, sig, consts, num_warps, num_stages, attrs


def specialisation_supported() -> bool:
    """Whether the specialised builds can be made here: this triton specialises a launch with
    `native_specialize_impl` and describes it by `parse_attr` as the JIT does (3.6 and 3.9
    checked), and its interpreter can run every op for the capture (decode's loops need
    triton >= 3.7 or numpy < 2.4)."""
    from triton._C import libtriton
    from triton.backends.compiler import BaseBackend

    from minitriton.kernels.decode import _check_interpreter_loops
    try:
        _check_interpreter_loops()
    except RuntimeError:
        return False
    return hasattr(libtriton, "native_specialize_impl") and hasattr(BaseBackend, "parse_attr")


def _launches_from_subprocess() -> list:
    """`capture_launches()` run in a child process under the interpreter (this one must not
    be: it compiles the kernels)."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="1", MINITRITON_BACKEND="triton")
    proc = subprocess.run([sys.executable, __file__, "--capture"], capture_output=True,
                          text=True, env=env, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode:
        raise RuntimeError("capturing the kernels' launches failed:\n" + proc.stderr[-3000:])
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _ptxas() -> str:
    """The newest ptxas the triton wheel ships (the PTX version Triton emits may be newer than
    the plain `ptxas` accepts)."""
    import triton.backends.nvidia as nv
    folder = os.path.join(os.path.dirname(nv.__file__), "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas in {folder}")


def parse_ptxas_log(out: str) -> dict:
    """Registers, spill bytes, stack frame and shared memory from a `ptxas -v` log. A stack
    frame alone is not a spill (sinf's slow-path argument reduction keeps a small local
    array)."""
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else 0  # noqa: E731
    return {"REG": grab(r"Used (\d+) registers"), "STACK": grab(r"(\d+) bytes stack frame"),
            "SPILL_ST": grab(r"(\d+) bytes spill stores"),
            "SPILL_LD": grab(r"(\d+) bytes spill loads"), "SMEM": grab(r"(\d+) bytes smem")}


_PTXAS_ARGV: dict = {}   # cc -> the ptxas command line Triton runs for that target


def _triton_ptxas_argv(cc: int):
    """The command line Triton itself runs ptxas with for `cc` (its ptxas for the target and its
    flags: triton 3.9, e.g., takes an older ptxas for sm_80 than for sm_90 and adds
    --regAllocOptLevel=2), recorded from one compile of a small kernel with Triton's cache
    bypassed, its input and output as "{ptx}" and "{out}"; None where it cannot be recorded
    (we then run the newest ptxas the wheel ships, with no flags but -v)."""
    if cc in _PTXAS_ARGV:
        return _PTXAS_ARGV[cc]
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    argv = None
    try:
        from triton import knobs
        import triton.backends.nvidia.compiler as nvc

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)

        seen, run = [], nvc.subprocess.run

        def record(cmd, *args, **kwargs):
            if "-v" in cmd and any(str(c).endswith(".ptx") for c in cmd):
                seen.append(list(map(str, cmd)))
            return run(cmd, *args, **kwargs)

        nvc.subprocess.run, always = record, knobs.compilation.always_compile
        knobs.compilation.always_compile = True
        try:
            triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "BLOCK":
                                                           "constexpr"},
                                     constexprs={"BLOCK": 128}),
                           target=GPUTarget("cuda", cc, 32))
        finally:
            nvc.subprocess.run, knobs.compilation.always_compile = run, always
        if seen:
            cmd = seen[-1]
            out = cmd.index("-o") + 1
            argv = ["{ptx}" if c.endswith(".ptx") else c for c in cmd]
            argv[out] = "{out}"
    except Exception as exc:   # (another triton: fall back to our own invocation)
        print(f"sm_{cc}: Triton's ptxas command not recorded ({type(exc).__name__}: {exc}); "
              "running the newest ptxas of the wheel with -v only", file=sys.stderr)
        argv = None
    _PTXAS_ARGV[cc] = argv
    return argv


def resource_usage(ptx: str, cc: int | None = None) -> dict:
    """Registers, spill bytes, stack frame and shared memory of the PTX, from `ptxas -v` run as
    Triton runs it for `cc` (`_triton_ptxas_argv`), else with the newest ptxas the wheel
    ships. (ptxas makes the same choices for the same PTX, flags and version: the cubin Triton
    builds from this PTX has these resources.)"""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        argv = _triton_ptxas_argv(cc) if cc is not None else None
        if argv is None:
            arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)    # sm_80, sm_90a
            argv = [_ptxas(), "-v", f"--gpu-name={arch}", "{ptx}", "-o", "{out}"]
        cmd = [c.replace("{ptx}", f.name).replace("{out}", os.devnull) for c in argv]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return parse_ptxas_log(out)


def compile_one(index: int, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, sig, constexprs, num_warps, num_stages, attrs = all_specs()[index]
    t0 = time.perf_counter()
    try:
        # (triton 3.2 names the constexpr values `constants`, 3.3 on `constexprs`)
        kw = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters \
            else "constants"
        extra = {"attrs": attrs} if attrs else {}
        src = ASTSource(fn=fn, signature=sig, **{kw: constexprs}, **extra)
        target = GPUTarget("cuda", cc, 32)
        options = {"num_warps": num_warps, "num_stages": num_stages}
        k = triton.compile(src, target=target, options=options)
        usage = resource_usage(k.asm["ptx"], cc)
    except Exception as exc:  # report every failure, not only the first
        return name, cc, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if usage["SPILL_ST"] + usage["SPILL_LD"] and not SPILLS_TOLERATED.search(name):
        # Did ptxas choose to spill (fewer registers than the block allows, for occupancy),
        # or must it? The same build, told the block's register budget.
        try:
            budget = min(255, 65536 // (32 * num_warps))
            capped = triton.compile(src, target=target, options={**options, "maxnreg": budget})
            usage["BUDGETED"] = resource_usage(capped.asm["ptx"], cc)
        except Exception:   # (a triton without maxnreg: the spill counts as forced)
            pass
    usage["SMEM"] = max(usage["SMEM"], int(k.metadata.shared))
    usage["seconds"] = round(time.perf_counter() - t0, 2)
    return name, cc, usage, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--only", default="", help="compile only the specs whose name matches")
    ap.add_argument("--plain", action="store_true",
                    help="only the plain builds (no launches captured, no specialised builds)")
    ap.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from minitriton.backend import interpreter_enabled

    if args.capture:   # (the child process of `_launches_from_subprocess`)
        import json
        print(json.dumps(capture_launches()))
        return 0
    if interpreter_enabled():
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    launches = None
    if not args.plain and specialisation_supported():
        launches = _launches_from_subprocess()
    _use_launches(launches)
    specs = all_specs()
    missing = []
    if launches is not None:   # every typical build has its specialised twin
        names = {s[0] for s in specs}
        missing = [s[0] for s in specs if not s[0].endswith("+spec")
                   and not NOT_TYPICAL.search(s[0]) and f"{s[0]}+spec" not in names
                   and re.search(args.only, s[0])]
    picked = [i for i, s in enumerate(specs) if re.search(args.only, s[0])]
    jobs = [(i, cc) for i in picked for cc in args.cc]
    import triton

    strict = spills_checked()
    failed = spilled = tolerated = chosen = 0
    print(f"{'kernel/config':58s} {'target':7s} {'regs':>5s} {'smem':>6s} {'spill':>5s} "
          f"{'stack':>5s}")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, initializer=_use_launches,
                                initargs=(launches,)) as pool:
        for name, cc, usage, err in pool.map(compile_one, *zip(*jobs), chunksize=4):
            if err:
                failed += 1
                print(f"{name:58s} sm_{cc:<4d} FAILED {err}")
                continue
            spill = usage["SPILL_ST"] + usage["SPILL_LD"]
            budgeted = usage.get("BUDGETED")
            note = ""
            if spill and SPILLS_TOLERATED.search(name):
                tolerated += 1
                note = "  spills (tolerated)"
            elif (spill and budgeted and not budgeted["SPILL_ST"] + budgeted["SPILL_LD"]
                  and spill <= BY_CHOICE_MAX_BYTES):
                chosen += 1     # ptxas traded them for occupancy: not forced by the kernel
                note = f"  spills by choice (none at {budgeted['REG']} registers)"
            elif spill:
                spilled += 1
                note = "  SPILLS"
            print(f"{name:58s} sm_{cc:<4d} {usage['REG']:5d} {usage['SMEM']:6d} "
                  f"{spill:5d} {usage['STACK']:5d}{note}")
    for name in missing:
        print(f"{name:58s} no launch captured for its specialised build")
    n_spec = sum(specs[i][0].endswith("+spec") for i, _ in jobs)
    print(f"{len(jobs)} compiles ({n_spec} specialised"
          f"{'' if launches is not None else '; none made: --plain, or not supported here'}), "
          f"{failed} failed, {spilled} spilled (triton {triton.__version__}"
          f"{'' if strict else '; spills are checked with triton 3.5, 3.6 and 3.9'}; "
          f"{chosen} spilling by ptxas's choice, {tolerated} tolerated spills in WIDE_D builds)")
    return 1 if failed or missing or (spilled and strict) else 0


if __name__ == "__main__":
    sys.exit(main())
