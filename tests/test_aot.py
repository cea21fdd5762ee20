"""Every kernel, in every config, compiles ahead of time for sm_80 and sm_90 without a GPU and
without a forced register spill, both as a build for any launch and as the build a GPU makes
for typical (aligned, contiguous) inputs (tests/aot_compile.py does the work in a process
without the interpreter). Spills fail the test with triton 3.5, 3.6 and 3.9, whose compilers
build every config without a forced spill (spills of at most 64 bytes that ptxas chooses for
occupancy, gone when the build is given the block's register budget, are printed); other
versions spill a few bytes in a few configs, which is printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


# The script's last line: compiles, specialised builds, failures, forced spills.
SUMMARY = r"(\d+) compiles \((\d+) specialised[^)]*\), (\d+) failed, (\d+) spilled"


def _run_check(*args: str, timeout: int):
    """tests/aot_compile.py with `args`, in a process without the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=script.parent.parent, timeout=timeout)


def test_kernels_compile_for_sm80_and_sm90_without_forced_spills():
    proc = _run_check(timeout=1200)
    print(proc.stdout[-20000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout
    summary = re.search(SUMMARY, proc.stdout)
    assert summary and int(summary.group(1)) > 0 and summary.group(3) == "0", proc.stdout[-3000:]
    from aot_compile import specialisation_supported, spills_checked
    if specialisation_supported():   # every plain build but WIDE_D's has a specialised twin
        assert int(summary.group(2)) > 0, proc.stdout[-3000:]
        assert "no launch captured" not in proc.stdout, proc.stdout[-3000:]
        # The specialisation reaches the builds: merge's pass 1, with unit strides along D as
        # constants and aligned pointers, compiles to other code (registers, shared memory).
        usage = {(name, target): (regs, smem) for name, target, regs, smem in re.findall(
            r"^(\S+)\s+(sm_\d+)\s+(\d+)\s+(\d+)", proc.stdout, re.M)}
        plain = ("merge[bf16,BD=128,proj=1,BS=8,w=4]", "sm_90")
        spec = (plain[0] + "+spec", plain[1])
        assert plain in usage and spec in usage, f"{plain} is no longer a config: pick another"
        assert usage[plain] != usage[spec], proc.stdout[-3000:]
    if spills_checked():
        assert summary.group(4) == "0", proc.stdout[-3000:]


def test_plain_builds_alone_report_the_same_summary():
    """--plain (what runs where the launches cannot be captured): the plain builds only, and a
    summary line the test above reads."""
    proc = _run_check("--plain", "--only", "^number$", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(SUMMARY, proc.stdout)
    assert summary and summary.groups()[:3] == ("2", "0", "0"), proc.stdout[-3000:]
    assert "+spec" not in proc.stdout


def test_the_fixed_config_fits_each_head_dim():
    """With MINITRITON_AUTOTUNE=0 on a GPU, merge pass 1 and restore launch the first config
    their pruner keeps for the launch's BLOCK_D (one of the builds compiled above), not one
    tile for every head dim; under the interpreter, the one config."""
    from minitriton.kernels import common
    from minitriton.kernels.merge import _prune as merge_prune
    from minitriton.kernels.restore import _prune as restore_prune

    class Recorder:
        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launches.append(kwargs)

    single = common.token_tile_configs()[0]
    for prune in (merge_prune, restore_prune):
        kernel = Recorder()
        fixed = common._OneConfig(kernel, single, prune=prune)
        for bd in (16, 32, 64, 128, 256):
            fixed[(1,)](BLOCK_D=bd)
            want = prune(common.token_tile_configs(), {}, BLOCK_D=bd)[0]
            got = kernel.launches[-1]
            assert (got["BLOCK_S"], got["num_warps"]) == (want.kwargs["BLOCK_S"],
                                                          want.num_warps), bd
    kernel = Recorder()
    common._OneConfig(kernel, single)[(1,)](BLOCK_D=256)     # (the interpreter's: as given)
    assert kernel.launches[-1]["BLOCK_S"] == single.kwargs["BLOCK_S"]
