"""`skillpack eval`: score base, full fine-tune, packs and equal-bytes baselines on the demo skills."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from skillpack_evals.evaluate import Score, evaluate_skill, markdown_table, plot, results_payload, write_json
from skillpacks.budget import parse_budget
from skillpacks.default_base import default_base_dir
from skillpacks.hub import resolve_checkpoint


def _budgets(text: str) -> list[float]:
    try:
        return [parse_budget(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skills", default="arithmetic,json_extract,sql", help="comma-separated demo skills")
    parser.add_argument("--base", help="base checkpoint folder or Hugging Face model id (default: the converted "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--tuned-root", help="folder holding one fine-tuned checkpoint per skill, named after it")
    parser.add_argument("--packs", default="packs/eval", help="folder of the packs to score, SKILL.1of16.skillpack "
                        "etc.; missing ones are built from base and fine-tune (default packs/eval)")
    parser.add_argument("--budgets", type=_budgets, default="1/8,1/16,1/32", help="pack budgets (default 1/8,1/16,1/32)")
    parser.add_argument("--presets", default="graftllm", help="comma-separated build presets to score too")
    parser.add_argument("--baseline-budgets", type=_budgets, default="1/16,1/32",
                        help="baselines are matched to the bytes of the pack at these budgets (default 1/16,1/32)")
    parser.add_argument("--n-test", type=int, default=50, help="held-out examples per skill (default 50)")
    parser.add_argument("--batch-size", type=int, default=25, help="generation batch (default 25)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="build the packs weighed on each skill's training pairs, as `skillpack graft` does")
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda when present)")
    parser.add_argument("--json", default="docs/results/quality.json", help="results file")
    parser.add_argument("--plot", default="docs/results/quality.png", help="accuracy-vs-size plot ('' for none)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="skip scoring: merge earlier results files into --json, --plot and the table")


def run(args: argparse.Namespace) -> int:
    command = "skillpack eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    try:
        if args.combine:
            scores, sources = [], []
            for path in args.combine:
                payload = json.loads(Path(path).read_text())
                scores += [Score(**s) for s in payload["scores"]]
                sources.append({"command": payload["command"], "machine": payload["machine"]})
            out = results_payload(scores, command)
            out["sources"] = sources
        else:
            if not args.tuned_root:
                raise ValueError("--tuned-root is required to score (it holds one fine-tuned checkpoint per skill).")
            base = resolve_checkpoint(args.base) if args.base else default_base_dir()
            presets = [p for p in args.presets.split(",") if p]
            scores: list[Score] = []
            for skill in [s for s in args.skills.split(",") if s]:
                done = list(scores)

                def save_partial(skill_scores, done=done):
                    write_json(Path(args.json), results_payload(done + skill_scores, command))

                scores += evaluate_skill(skill, base, Path(args.tuned_root) / skill, Path(args.packs), args.budgets,
                                         presets, args.baseline_budgets, args.n_test, args.batch_size,
                                         device=args.device, on_score=save_partial, sensitivity=args.sensitivity)
            out = results_payload(scores, command)
    except (ValueError, OSError) as e:
        print(f"skillpack eval: {e}", file=sys.stderr)
        return 2
    write_json(Path(args.json), out)
    if args.plot:
        plot(scores, Path(args.plot))
    print(markdown_table(scores))
    print(f"machine: {out['machine']}")
    return 0
