"""`skillpack fusion-eval --packs DIR [--base DIR]`: router vs oracle, best single pack, and merges on the demo skills."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from skillpack_evals.fusion_eval import markdown_table, run_fusion_eval, save_report
from skillpack_evals.skills import SKILLS
from skillpacks.default_base import default_base_dir
from skillpacks.hub import resolve_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="the base checkpoint folder or Hugging Face model id (default: the converted "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--packs", default="packs", help="folder with SKILL.skillpack for each skill (default packs/)")
    parser.add_argument("--skills", nargs="+", default=sorted(SKILLS), choices=sorted(SKILLS))
    parser.add_argument("--n-test", type=int, default=30, help="held-out test prompts per skill (default 30)")
    parser.add_argument("--n-val", type=int, default=8, help="held-out prompts per skill for tuning λ (default 8)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 0.75, 1.0], help="task arithmetic λ grid")
    parser.add_argument("--ties-lambdas", type=float, nargs="+", default=[0.75, 1.0, 1.5], help="TIES λ grid")
    parser.add_argument("--ties-density", type=float, default=0.2, help="fraction of each delta TIES keeps")
    parser.add_argument("--ensemble-k", type=int, default=0, help="also score the top-k log-prob ensemble (k >= 2)")
    parser.add_argument("--router-examples", type=int, default=128, help="examples per pack for the router")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--out", default="docs/results/fusion.json", help="results JSON (written after every row)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.base is None:
            args.base = default_base_dir()
        args.base = resolve_checkpoint(args.base)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    command = "skillpack fusion-eval " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["fusion-eval"] else sys.argv[1:])
    out = Path(args.out)
    try:
        report = run_fusion_eval(Path(args.base), Path(args.packs), args.skills, args.n_test, args.n_val,
                                 tuple(args.lambdas), tuple(args.ties_lambdas), args.ties_density, args.ensemble_k,
                                 args.router_examples, args.batch_size,
                                 on_row=lambda r: save_report(r, out, command))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    print(f"results written to {out}")
    return 0
