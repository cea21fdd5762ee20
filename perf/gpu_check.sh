#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repository root of a working tree:
#
#     bash perf/gpu_check.sh [OUT_DIR]        # OUT_DIR: first argument, else $OUT,
#                                             # else perf/results/gpu-check
#
# It installs nothing: the machine needs torch, triton (>= 3.2), numpy, pytest and hypothesis;
# the tree is used in place through PYTHONPATH. Steps, each with a hard timeout, all inside
# BUDGET_S seconds (default 450, under 8 minutes) whatever happens:
#
#   env        env.txt: nvidia-smi, GPU, torch / triton / CUDA versions, commit
#   tests      the test suite on CUDA tensors (MINITRITON_TEST_DEVICE=cuda: the Triton kernels
#              compiled for the GPU, not the interpreter), junit XML in tests.xml
#   sanitize   compute-sanitizer memcheck over perf/sanitize_smoke.py (a plain run without it)
#   perf-*     the key points (python -m perf.sweep --grid check): merge and restore at inputs
#              of 64 MiB and more, decode at B in {1, 8, 32} x S in {1K, 8K, 32K, 128K}
#
# Everything lands in OUT_DIR: one .log per step, summary.txt (a line per step and the targets'
# PASS/MISS lines), and the sweeps' CSV / Markdown / PNG under OUT_DIR/perf. Exit status 1 when
# a step failed or timed out.

set -u
OUT_DIR=${1:-${OUT:-perf/results/gpu-check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-450}
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
FAILED=0
: > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with a hard timeout (cut to what is left of the budget),
# output to NAME.log, one line in summary.txt.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
    if (( left < 15 )); then
        printf '%-14s SKIPPED: the %ss budget is spent\n' "$name" "$BUDGET_S" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    (( limit > left )) && limit=$left
    local t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if (( rc == 124 || rc == 137 )); then
        verdict="TIMEOUT (${limit}s)"
        FAILED=1
    elif (( rc != 0 )); then
        verdict="FAILED (exit $rc)"
        FAILED=1
    fi
    printf '%-14s %-20s %4ss  %s.log\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$name" \
        | tee -a "$SUMMARY"
}

commit() {
    git rev-parse HEAD 2>/dev/null && return
    if [ -n "${MINITRITON_COMMIT:-}" ]; then echo "$MINITRITON_COMMIT"
    elif [ -f COMMIT ]; then cat COMMIT
    else echo unknown
    fi
}

write_env() {
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "host: $(hostname)"
        echo "commit: $(commit)"
        git status --short 2>/dev/null | head -20 | sed 's/^/  changed: /'
        "$PY" - <<'EOF'
import sys, torch, triton
print("python:", sys.version.split()[0])
print("torch:", torch.__version__, "| cuda:", torch.version.cuda)
print("triton:", triton.__version__)
ok = torch.cuda.is_available()
print("cuda available:", ok)
if ok:
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0),
          "| capability:", torch.cuda.get_device_capability(0),
          "| SMs:", p.multi_processor_count, "| memory GiB:", round(p.total_memory / 2**30, 1))
try:
    import flash_attn
    print("flash_attn:", flash_attn.__version__)
except Exception as exc:
    print("flash_attn: not importable:", type(exc).__name__)
EOF
        echo "compute-sanitizer: ${SANITIZER:-not found}"
        echo
        nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    } > "$OUT_DIR/env.txt" 2>&1
}

find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    local c
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
             /opt/cuda/bin/compute-sanitizer; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
    # The pip package nvidia-cuda-sanitizer-api ships the binary inside site-packages.
    "$PY" - 2>/dev/null <<'EOF'
import glob, os, site
for d in site.getsitepackages():
    for c in glob.glob(os.path.join(d, "nvidia", "*", "compute-sanitizer", "compute-sanitizer")):
        if os.access(c, os.X_OK):
            print(c)
            raise SystemExit
EOF
}

SANITIZER=$(find_sanitizer)
export PY OUT_DIR SANITIZER
export -f write_env commit
step env 20 bash -c write_env
# One config per kernel in the tests (autotuning every drawn shape would cost minutes); the
# perf steps autotune.
step tests 150 env MINITRITON_TEST_DEVICE=cuda MINITRITON_AUTOTUNE=0 "$PY" -m pytest -q -m "not model" \
    -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" tests
if [ -n "$SANITIZER" ] && [ -x "$SANITIZER" ]; then
    step sanitize 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 "$PY" perf/sanitize_smoke.py
else
    echo "compute-sanitizer not found: sanitize_smoke.py runs without it" \
        | tee -a "$SUMMARY"
    step sanitize 60 "$PY" perf/sanitize_smoke.py
fi
step perf-merge 50 "$PY" -m perf.sweep --op merge --grid check --device cuda \
    --out "$OUT_DIR/perf" --no-progress
step perf-restore 25 "$PY" -m perf.sweep --op restore --grid check --device cuda \
    --out "$OUT_DIR/perf" --no-progress
step perf-decode 100 "$PY" -m perf.sweep --op decode --grid check --device cuda \
    --out "$OUT_DIR/perf" --no-progress

{
    echo
    echo "targets (from the sweeps' Markdown summaries):"
    grep -h -E '^(PASS|MISS|n/a) ' "$OUT_DIR"/perf/*.md 2>/dev/null \
        || echo "  none: no sweep finished"
    echo
    echo "total: $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget"
} | tee -a "$SUMMARY"
exit $FAILED
