#!/usr/bin/env bash
# One GPU check for the kernels: device info, the compiled-kernel tests, then the benchmark.
# Usage: OUT=/some/dir bash bench/gpu_check.sh   (run from anywhere; results land in $OUT)
# A failing test does not stop the benchmark; the exit status reports both.
set -u
OUT="${OUT:?set OUT to the folder where results should be written}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# The GPU image does not have the project installed: link its folders under their import
# names (pyproject.toml's package-dir) instead of installing it there.
names=$(mktemp -d)
ln -s "$PWD/kernels" "$names/skillpack_kernels"
ln -s "$PWD/server" "$names/skillpack_server"
# tests/conftest.py turns the interpreter on unless told otherwise: compile for the GPU
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD:$names${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

start=$SECONDS
timeout 60 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_rc in $((SECONDS - start)) s"

start=$SECONDS
timeout 85 python3 bench/lowrank_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench-kernels.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit $bench_rc in $((SECONDS - start)) s"

echo "SUMMARY gpu-tests=$tests_rc benchmark=$bench_rc (0 = ok, 124 = timed out)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
