#!/usr/bin/env bash
# Rebuild the demo packs: write each skill's seeded training split, fully fine-tune the
# base on it (skillpack graft), keep the fine-tuned checkpoint, and write the pack.
#   BASE        base checkpoint folder (default: the converted SmolLM2-135M-Instruct)
#   TUNED_ROOT  where the fine-tuned checkpoints go, one folder per skill (default /work/cache/tuned)
#   PACKS       where the packs go (default packs/), as SKILL.skillpack
#   DEVICE      cpu / cuda (default: cuda when present); JOBS=3 trains the skills in parallel
# The recipe below made the committed packs (JOBS=1 DEVICE=cpu on the project's 2-core box,
# ~9 min per 80 steps; see docs/RESULTS.md). arithmetic gets twice the steps of the others.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SKILLS=${SKILLS:-"arithmetic json_extract sql"}
TUNED_ROOT=${TUNED_ROOT:-/work/cache/tuned}
PACKS=${PACKS:-packs}
DATA=${DATA:-$TUNED_ROOT/data}
STEPS=${STEPS:-} LR=1e-4 BATCH=8 WARMUP=8 SEED=0 BUDGET=1/32  # STEPS overrides every skill's steps (smoke tests only)
steps_of() { if [ -n "$STEPS" ]; then echo "$STEPS"; elif [ "$1" = arithmetic ]; then echo 160; else echo 80; fi; }
JOBS=${JOBS:-1}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
base_args=()
[ -n "${BASE:-}" ] && base_args=(--base "$BASE")
device_args=()
[ -n "${DEVICE:-}" ] && device_args=(--device "$DEVICE")
mkdir -p "$DATA" "$PACKS" "$TUNED_ROOT"

graft_one() {
  local skill=$1
  "$PY" -m skillpack_evals.skills "$skill" train "$DATA/$skill.train.jsonl"
  "$PY" -m skillpacks.cli graft "${base_args[@]}" "${device_args[@]}" --data "$DATA/$skill.train.jsonl" \
    --out "$PACKS/$skill.skillpack" --name "$skill" \
    --description "demo skill '$skill' (evals/skills/$skill.py), full fine-tune of the base" \
    --steps "$(steps_of "$skill")" --lr "$LR" --batch-size "$BATCH" --warmup-steps "$WARMUP" --seed "$SEED" \
    --budget "$BUDGET" --keep-tuned "$TUNED_ROOT/$skill" > "$TUNED_ROOT/$skill.log" 2>&1
  tail -n 1 "$TUNED_ROOT/$skill.log"
}

running=0
for skill in $SKILLS; do
  graft_one "$skill" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
