"""Triton kernels, one file per kernel family: the kernel(s), then the launcher.

Each module exposes `aot_specs()`: every (kernel, signature, constexprs, num_warps, num_stages)
that the launcher can run, so the test suite compiles all of them ahead of time for real GPUs.
"""
