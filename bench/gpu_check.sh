#!/usr/bin/env bash
# The one GPU run (issue #15): every figure in one go, each stage under its own time limit,
# OUT/gpu_check.json rewritten after every stage so a run cut off anywhere keeps what it measured.
#
#   OUT=/some/dir bash bench/gpu_check.sh                      # on the GPU machine (docs/KERNELS.md)
#   OUT=/some/dir GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  # CPU, tiny shapes, Triton interpreted (tests/bench)
#
# Stages: wheels (offline install of what the image lacks, from .gpu-wheels/, made by
# bench/fetch_gpu_wheels.sh), versions, the -m gpu tests, bench/lowrank_kernels.py,
# bench/attention_kernels.py, bench/gpu_engine.py, bench/gpu_http.py. A failing stage does not stop
# the next; the exit status is 0 only when every stage passed. The whole run stops starting
# stages after GPU_CHECK_BUDGET_S seconds (default 460: the machine gives 8 minutes of work).
set -u
OUT="${OUT:?set OUT to the folder where results should be written}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS:-$PWD/.gpu-wheels}"
CACHE="${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/skillpack-gpu-bench}"
# The GPU image does not have the project installed: link its folders under their import
# names (pyproject.toml's package-dir) instead of installing it there; wheels go to $names/site.
names=$(mktemp -d)
trap 'rm -rf "$names"' EXIT
ln -s "$PWD/kernels" "$names/skillpack_kernels"
ln -s "$PWD/server" "$names/skillpack_server"
ln -s "$PWD/evals" "$names/skillpack_evals"
site="$names/site"
if [ "$DRY" = 1 ]; then
    # one torch thread: on a small shared CPU two threads spin-wait on each other
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    DRY_FLAG=(--dry-run)
    TEST_FLAGS=(--collect-only)  # the CPU cannot run them; collecting still imports every GPU test
    CACHE="$OUT/cache"
else
    # tests/conftest.py turns the interpreter on unless told otherwise: compile for the GPU
    export TRITON_INTERPRET=0
    DRY_FLAG=()
    TEST_FLAGS=()
fi
export PY WHEELS site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD:$names:$site${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$OUT/stages.json" "$OUT/gpu_check.json"

install_wheels() {
    local need='import fastapi, uvicorn, pydantic, pydantic_settings, multipart'
    if "$PY" -c "$need" 2>/dev/null; then
        echo "fastapi, uvicorn, pydantic, pydantic-settings and python-multipart import already: nothing to install"
        return 0
    fi
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run bash bench/fetch_gpu_wheels.sh on a machine with PyPI, and carry .gpu-wheels"
        return 1
    fi
    # exactly the downloaded wheels, no resolving, no index; pip missing: a wheel is a zip to unpack
    "$PY" -m pip install --quiet --no-index --no-deps --target "$site" "$WHEELS"/*.whl ||
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$site" "$WHEELS"/*.whl || return 1
    PYTHONPATH="$site:${PYTHONPATH:-}" "$PY" -c \
        "$need; print('installed into $site: fastapi', fastapi.__version__, 'pydantic', pydantic.__version__)"
}
export -f install_wheels

deadline=$((SECONDS + BUDGET))
failed=()
stage() {  # stage NAME LIMIT_S COMMAND...: run under `timeout`, log to OUT/NAME.log, record it
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped ($left s of the ${BUDGET} s budget left)"
        "$PY" bench/gpu_check_report.py stage "$OUT" "$name" skipped 0 0
        failed+=("$name")
        return
    fi
    echo "== $name (limit $limit s): $*"
    local start=$SECONDS
    # timeout signals the command's whole process group: a server the stage started goes too
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    "$PY" bench/gpu_check_report.py stage "$OUT" "$name" "$rc" "$((SECONDS - start))" "$limit"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

stage wheels 60 bash -c install_wheels
stage versions 30 "$PY" bench/gpu_check_report.py versions "$OUT"
stage gpu-tests 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE --durations=5 ${TEST_FLAGS[@]+"${TEST_FLAGS[@]}"} \
    tests/kernels tests/server/test_runtime.py tests/server/test_mixed_batch.py
stage kernels 90 "$PY" bench/lowrank_kernels.py --out "$OUT" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}
stage attention 40 "$PY" bench/attention_kernels.py --out "$OUT" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}
stage engine 190 "$PY" bench/gpu_engine.py --out "$OUT" --cache "$CACHE" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}
stage http 90 "$PY" bench/gpu_http.py --out "$OUT" --cache "$CACHE" ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}

echo "SUMMARY ($((SECONDS)) s; $OUT/gpu_check.json)"
"$PY" bench/gpu_check_report.py summary "$OUT"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "not ok: ${failed[*]}"
    exit 1
fi
echo "all stages ok"
