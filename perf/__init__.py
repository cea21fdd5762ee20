"""Benchmarks of minitriton's ops next to their baselines.

    python -m perf.sweep --op merge|restore|decode|all [--quick] [--out DIR]
    python perf/bench_cpu.py          # the CPU figures of the torch path
    bash perf/gpu_check.sh OUT_DIR    # tests, compute-sanitizer and key points on a GPU machine

See docs/perf.md for what each column means.
"""
