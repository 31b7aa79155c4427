"""Packs built with and without measured sensitivity, side by side: token KL to the fine-tune.

For each skill and budget the pack is built twice from the same fine-tune: plainly, and
weighed on the skill's training pairs (`build_pack(sensitivity=...)`, what `skillpack
graft` does). Each is scored by the `skillpack eval` measure: the mean per-token
KL(fine-tune ‖ base + pack) on the held-out reference responses. Needs the fine-tuned
checkpoints, one folder per skill under --tuned-root (scripts/make_demo_packs.sh keeps
them).

    python -m bench.sensitivity_kl --tuned-root /path/to/tuned [--skills arithmetic,sql] [--budgets 1/16,1/32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from skillpack_evals.evaluate import (
    exact_deltas, machine, mean_kl, pack_variant, read_state, response_logprobs, set_weights, write_json,
)
from skillpack_evals.skills import demo_split
from skillpacks.budget import budget_label, parse_budget
from skillpacks.build import build_pack
from skillpacks.checkpoint import load_causal_lm
from skillpacks.default_base import default_base_dir
from skillpacks.sensitivity import DEFAULT_EXAMPLES


def measure(skill: str, base_dir: Path, tuned_dir: Path, packs: Path, budgets: list[float], examples: int,
            n_test: int) -> list[dict]:
    train, test = demo_split(skill, n_test=n_test)
    pairs = [{"prompt": e.prompt, "response": e.response} for e in train]
    tokenizer, model = load_causal_lm(base_dir, "the benchmark runs the base model")
    base = read_state(base_dir)
    set_weights(model, base, exact_deltas(base, read_state(tuned_dir)))
    reference = response_logprobs(model, tokenizer, test)
    rows = []
    for budget in budgets:
        label = budget_label(budget)
        for weighed in (False, True):
            path = packs / f"{skill}.{label.replace('/', 'of')}.{'weighed' if weighed else 'plain'}.skillpack"
            t0 = time.time()
            build_pack(base_dir, tuned_dir, path, name=skill, budget=budget, progress=False,
                       sensitivity=pairs if weighed else None, sensitivity_examples=examples)
            build_s = time.time() - t0
            variant = pack_variant(path, label, label)
            set_weights(model, base, variant.deltas)
            kl = mean_kl(reference, response_logprobs(model, tokenizer, test))
            rows.append({"skill": skill, "budget": label, "sensitivity": weighed, "bytes": variant.nbytes,
                         "kl": kl, "build_seconds": round(build_s, 1)})
            print(f"{skill:<13} {label:>5} {'weighed' if weighed else 'plain':<8} {variant.nbytes / 2**20:7.2f} MiB "
                  f"KL {kl:.2e}  build {build_s:5.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuned-root", required=True, help="folder with one fine-tuned checkpoint per skill")
    parser.add_argument("--base", help="base checkpoint (default: the converted SmolLM2-135M-Instruct)")
    parser.add_argument("--skills", default="arithmetic,json_extract,sql")
    parser.add_argument("--budgets", default="1/16,1/32")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="training pairs to measure on")
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--packs", default=str(Path.home() / ".cache/skillpack/sensitivity-packs"),
                        help="where the packs are written (outside the repository: 8-16 MB each)")
    parser.add_argument("--json", default="bench/results/sensitivity_kl.json")
    args = parser.parse_args(argv)
    base_dir = Path(args.base) if args.base else default_base_dir()
    packs = Path(args.packs)
    packs.mkdir(parents=True, exist_ok=True)
    rows = []
    for skill in args.skills.split(","):
        rows += measure(skill, base_dir, Path(args.tuned_root) / skill, packs,
                        [parse_budget(b) for b in args.budgets.split(",")], args.examples, args.n_test)
        write_json(Path(args.json), {"machine": machine(), "examples": args.examples, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
