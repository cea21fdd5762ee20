#!/usr/bin/env bash
# The one script to run on a GPU machine, from the repository root of a working tree:
#
#     MINITRITON_COMMIT=<sha> bash perf/gpu_check.sh [OUT_DIR]
#
# OUT_DIR: the first argument, else $OUT, else perf/results/gpu-check. MINITRITON_COMMIT names
# the commit when the tree has no .git (a copied working tree); a COMMIT file does too.
#
# It installs nothing: the machine needs torch, triton (>= 3.2), numpy, pytest and hypothesis
# (pytest-xdist, when there, runs the tests on 8 processes); the tree is used in place through
# PYTHONPATH. Steps, each with a hard timeout, all inside BUDGET_S seconds (default 450, under
# 8 minutes) whatever happens:
#
#   env        env.txt: nvidia-smi, GPU, torch / triton / CUDA versions, commit
#   tests      the kernel tests on CUDA tensors (MINITRITON_TEST_DEVICE=cuda: the Triton kernels
#              compiled for the GPU, not the interpreter), junit XML; the CPU-only tests (the
#              ahead-of-time compile check, the cache, the CPU perf harness, transformers) are
#              left out; one config per kernel and head dim (MINITRITON_AUTOTUNE=0)
#   smoke      perf/sanitize_smoke.py: small launches with odd shapes, strides, ragged lengths
#   sanitize   the same under compute-sanitizer memcheck, when it is installed and supports the
#              device ("unavailable" otherwise: e.g. under gVisor)
#   perf-*     the key points (python -m perf.sweep --grid check): merge and restore at inputs
#              of 64 MiB and more, decode at B in {1, 8, 32} x S in {1K, 8K, 32K, 128K}
#
# OUT_DIR receives at most six files, refreshed after every step (so a run cut short still
# leaves what it did): summary.txt (a line per step, the targets' PASS/MISS lines), env.txt,
# tests.txt (the test summary and failures), perf.md and perf.csv (the sweeps' tables), and
# gpu-check.tar.gz with every log, the junit XML and the sweeps' files and plots. Steps are
# stopped with SIGINT, so pytest and the sweeps still write their reports. Exit status 1 when
# a step failed or timed out.

set -u
OUT_DIR=${1:-${OUT:-perf/results/gpu-check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1     # (the repository root: tests, perf)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minitriton-gpu-check.XXXXXX")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
START=$(date +%s)
SUMMARY="$WORK/summary.txt"
FAILED=0
: > "$SUMMARY"

# What comes back: a few files in OUT_DIR, the rest in one archive.
publish() {
    cp "$SUMMARY" "$OUT_DIR/summary.txt"
    [ -f "$WORK/env.txt" ] && cp "$WORK/env.txt" "$OUT_DIR/env.txt"
    if [ -f "$WORK/tests.log" ]; then
        { grep -E '^(FAILED|ERROR) ' "$WORK/tests.log" | head -60
          tail -n 5 "$WORK/tests.log"; } > "$OUT_DIR/tests.txt"
    fi
    if compgen -G "$WORK/perf/*.md" > /dev/null; then
        cat "$WORK"/perf/*.md > "$OUT_DIR/perf.md"
    fi
    if compgen -G "$WORK/perf/*.csv" > /dev/null; then   # (one stamp and header: the first's)
        awk 'FNR == NR || !/^(#|op,)/' "$WORK"/perf/*.csv > "$OUT_DIR/perf.csv"
    fi
    tar -czf "$OUT_DIR/gpu-check.tar.gz.part" -C "$WORK" . 2>/dev/null \
        && mv "$OUT_DIR/gpu-check.tar.gz.part" "$OUT_DIR/gpu-check.tar.gz"
}

# step NAME LIMIT_S CMD...: run CMD with a hard timeout (cut to what is left of the budget;
# SIGINT first, then SIGKILL 10 s later), output to NAME.log, one line in summary.txt.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET_S - ($(date +%s) - START) - 15 ))
    if (( left < 15 )); then
        printf '%-14s SKIPPED: the %ss budget is spent\n' "$name" "$BUDGET_S" | tee -a "$SUMMARY"
        FAILED=1
        publish
        return
    fi
    (( limit > left )) && limit=$left
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if (( rc == 124 || rc == 137 )); then
        verdict="TIMEOUT (${limit}s)"
        FAILED=1
    elif [ "$name" = sanitize ] && { ! grep -q "ERROR SUMMARY" "$WORK/$name.log" \
            || grep -q "Device not supported" "$WORK/$name.log"; }; then
        verdict="unavailable (exit $rc)"      # the tool could not check: not a failure
    elif (( rc != 0 )); then
        verdict="FAILED (exit $rc)"
        FAILED=1
    fi
    printf '%-14s %-22s %4ss  %s.log\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$name" \
        | tee -a "$SUMMARY"
    publish
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
        nvidia-smi 2>&1 || echo "nvidia-smi: not available"   # (first: no CUDA init needed)
        echo
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
    } > "$WORK/env.txt" 2>&1
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
export PY WORK SANITIZER
export -f write_env commit
step env 40 bash -c write_env

# The kernel tests, the files that launch them first; one config per kernel (autotuning every
# drawn shape would cost minutes; the perf steps autotune). pytest-xdist spreads the kernels'
# compiles over 8 processes when it is installed.
# (pytest through a line that gives SIGINT back its KeyboardInterrupt: a shell that starts
# this script in the background would have it ignored, and pytest's reports would be lost.)
PYTEST="import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler)"
PYTEST+="; sys.exit(pytest.main(sys.argv[1:]))"
XDIST=""
"$PY" -c "import xdist" 2> /dev/null && XDIST="-n 8"
# shellcheck disable=SC2086
step tests 180 env MINITRITON_TEST_DEVICE=cuda MINITRITON_AUTOTUNE=0 "$PY" -c "$PYTEST" \
    -q -m "not model" -p no:cacheprovider $XDIST --junitxml="$WORK/tests.xml" \
    tests/test_merge.py tests/test_decode.py tests/test_errors.py tests/test_decode_errors.py
# (one config per head dim here too: under memcheck, autotuning's many timed launches would
# take minutes)
step smoke 40 env MINITRITON_AUTOTUNE=0 "$PY" perf/sanitize_smoke.py
if [ -n "$SANITIZER" ] && [ -x "$SANITIZER" ]; then
    step sanitize 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 MINITRITON_AUTOTUNE=0 "$SANITIZER" \
        --tool memcheck --report-api-errors no --error-exitcode 1 "$PY" perf/sanitize_smoke.py
else
    echo "sanitize       unavailable: compute-sanitizer not found" | tee -a "$SUMMARY"
fi
step perf-merge 80 "$PY" -m perf.sweep --op merge --grid check --device cuda \
    --out "$WORK/perf" --no-progress
step perf-restore 45 "$PY" -m perf.sweep --op restore --grid check --device cuda \
    --out "$WORK/perf" --no-progress
step perf-decode 120 "$PY" -m perf.sweep --op decode --grid check --device cuda \
    --out "$WORK/perf" --no-progress

{
    echo
    echo "targets (from the sweeps' Markdown summaries):"
    grep -h -E '^(PASS|MISS|n/a) ' "$WORK"/perf/*.md 2>/dev/null \
        || echo "  none: no sweep wrote its summary"
    echo
    echo "total: $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget"
} | tee -a "$SUMMARY"
publish
rm -rf "$WORK"
exit $FAILED
