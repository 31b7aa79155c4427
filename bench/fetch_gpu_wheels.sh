#!/usr/bin/env bash
# Download the wheels the GPU image lacks into .gpu-wheels/ (git-ignored), for bench/gpu_check.sh to
# install offline there: CPython 3.12, manylinux x86_64, at requirements-serve.lock's versions (the
# Docker image's), so the GPU run serves with what CI tests. Needs PyPI; run it here, then carry the
# folder with the tree (docs/KERNELS.md, "The GPU run").
#   bash bench/fetch_gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.gpu-wheels}"
PY="${PYTHON:-python3}"
# what the server imports that the image (torch, triton, transformers, httpx, prometheus-client, ...)
# does not have; uvicorn's fast HTTP parser and event loop as in uvicorn[standard]; pip adds their dependencies
WANT=(fastapi uvicorn httptools uvloop pydantic pydantic-settings python-multipart)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -E '^[a-z0-9][a-z0-9._-]*==' requirements-serve.lock | sed 's/ .*//' > "$pins"  # name==version, no hashes
rm -rf "$DIR"
mkdir -p "$DIR"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -c "$pins" -d "$DIR" "${WANT[@]}"
# the image's own torch stack must never be shadowed from this folder
if ls "$DIR" | grep -qiE '^(torch|triton|transformers|nvidia)[-_]'; then
    echo "refusing: the download pulled in part of the torch stack:" >&2
    ls "$DIR" >&2
    exit 1
fi
ls "$DIR"
du -sh "$DIR"
