"""Compile every Triton kernel in every config ahead of time for real GPUs (sm_80 and sm_90),
without a GPU, and read each cubin's registers, shared memory and spills.

    python tests/aot_compile.py [--jobs N] [--cc 80 90] [--only REGEX]

Prints one line per (kernel, config, target): registers, shared memory, spill bytes and stack
frame, as ptxas reports them; exits 1 on a compile failure, or on any spill with the tritons in
SPILL_FREE (3.5, 3.6, 3.9; other versions print their spills). Must run without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions). Used by tests/test_aot.py.
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

# The (major, minor) tritons whose compilers every config is checked spill-free with: 3.5, 3.6
# and 3.9. The others compile every config too, with spills in some of them (README, Versions),
# which are printed but not a failure.
SPILL_FREE = {(3, 5), (3, 6), (3, 9)}
# Builds whose spills are printed but never a failure: decode's WIDE_D (int64 offsets along D
# for e and the retained rows), which only a hand-built view of a pair with a D stride above
# 2^31 / (D - 1) launches.
SPILLS_TOLERATED = re.compile(r"_wideD$")


def spills_checked() -> bool:
    """True when this triton is one of SPILL_FREE (a spill is then a failure)."""
    import triton

    from minitriton.kernels.common import version
    return version(triton.__version__) in SPILL_FREE


KERNEL_MODULES = ["minitriton.kernels.merge", "minitriton.kernels.restore",
                  "minitriton.kernels.decode"]


def all_specs():
    specs = []
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        specs.extend(mod.aot_specs())
    return specs


def _ptxas() -> str:
    """The newest ptxas the triton wheel ships (the PTX version Triton emits may be newer than
    the plain `ptxas` accepts)."""
    import triton.backends.nvidia as nv
    folder = os.path.join(os.path.dirname(nv.__file__), "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas in {folder}")


def resource_usage(ptx: str) -> dict:
    """Registers, spill bytes, stack frame and shared memory from `ptxas -v`. A stack frame
    alone is not a spill (sinf's slow-path argument reduction keeps a small local array)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)    # sm_80, sm_90a
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else 0  # noqa: E731
    return {"REG": grab(r"Used (\d+) registers"), "STACK": grab(r"(\d+) bytes stack frame"),
            "SPILL_ST": grab(r"(\d+) bytes spill stores"),
            "SPILL_LD": grab(r"(\d+) bytes spill loads"), "SMEM": grab(r"(\d+) bytes smem")}


def compile_one(index: int, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, sig, constexprs, num_warps, num_stages = all_specs()[index]
    t0 = time.perf_counter()
    try:
        # (triton 3.2 names the constexpr values `constants`, 3.3 on `constexprs`)
        kw = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters \
            else "constants"
        src = ASTSource(fn=fn, signature=sig, **{kw: constexprs})
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:  # report every failure, not only the first
        return name, cc, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    usage = resource_usage(k.asm["ptx"])
    usage["SMEM"] = max(usage["SMEM"], int(k.metadata.shared))
    usage["seconds"] = round(time.perf_counter() - t0, 2)
    return name, cc, usage, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--only", default="", help="compile only the specs whose name matches")
    args = ap.parse_args(argv)
    from minitriton.backend import interpreter_enabled

    if interpreter_enabled():
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    specs = all_specs()
    picked = [i for i, s in enumerate(specs) if re.search(args.only, s[0])]
    jobs = [(i, cc) for i in picked for cc in args.cc]
    import triton

    strict = spills_checked()
    failed = spilled = tolerated = 0
    print(f"{'kernel/config':58s} {'target':7s} {'regs':>5s} {'smem':>6s} {'spill':>5s} "
          f"{'stack':>5s}")
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name, cc, usage, err in pool.map(compile_one, *zip(*jobs), chunksize=4):
            if err:
                failed += 1
                print(f"{name:58s} sm_{cc:<4d} FAILED {err}")
                continue
            spill = usage["SPILL_ST"] + usage["SPILL_LD"]
            ok = bool(spill) and bool(SPILLS_TOLERATED.search(name))
            spilled += bool(spill) and not ok
            tolerated += ok
            print(f"{name:58s} sm_{cc:<4d} {usage['REG']:5d} {usage['SMEM']:6d} "
                  f"{spill:5d} {usage['STACK']:5d}"
                  + ("  spills (tolerated)" if ok else "  SPILLS" if spill else ""))
    print(f"{len(jobs)} compiles, {failed} failed, {spilled} spilled (triton {triton.__version__}"
          f"{'' if strict else '; spills are checked with triton 3.5, 3.6 and 3.9'}; "
          f"{tolerated} tolerated spills in WIDE_D builds)")
    return 1 if failed or (spilled and strict) else 0


if __name__ == "__main__":
    sys.exit(main())
