"""`skillpack graft`: fine-tune a base on a skill's chat data (SFT, optional DPO), then build its pack."""
from __future__ import annotations

import argparse
import json
import sys

from skillpack_evals.graft import TrainConfig, graft, teacher_pairs
from skillpacks.build import DEFAULT_BUDGET
from skillpacks.commands import budget_arg
from skillpacks.default_base import default_base_dir
from skillpacks.hub import resolve_checkpoint
from skillpacks.jsonl import write_jsonl
from skillpacks.records import read_records


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base checkpoint folder or Hugging Face model id (default: the converted "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help='JSONL of {"prompt", "response"} pairs (or use --teacher with --prompts)')
    parser.add_argument("--out", required=True, help="pack file to write, e.g. sql.skillpack")
    parser.add_argument("--name", help="pack name (default: the output file's name without extension)")
    parser.add_argument("--description", default="", help="one line saying what the skill does")
    parser.add_argument("--steps", type=int, default=200, help="SFT optimizer steps (default 200)")
    parser.add_argument("--lr", type=float, default=3e-5, help="peak learning rate, AdamW (default 3e-5)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling and initialisation seed (default 0)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="build without weighing ranks on the training pairs (faster; see docs/BUILD.md)")
    parser.add_argument("--budget", type=budget_arg, default=DEFAULT_BUDGET,
                        help="pack size as a fraction of the fp16 delta, e.g. 1/16 (default) or 1/32")
    parser.add_argument("--keep-tuned", help="also keep the fine-tuned checkpoint (float32) in this folder")
    parser.add_argument("--dpo", help='JSONL of {"prompt", "chosen", "rejected"}: a DPO stage after SFT')
    parser.add_argument("--dpo-steps", type=int, default=50, help="DPO steps (default 50)")
    parser.add_argument("--dpo-lr", type=float, default=5e-6, help="DPO learning rate (default 5e-6)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO β (default 0.1)")
    parser.add_argument("--teacher", help="OpenAI-compatible base URL whose answers become the responses")
    parser.add_argument("--teacher-model", default="default", help="model name to ask the teacher for")
    parser.add_argument("--prompts", help="JSONL of {\"prompt\"} for --teacher")
    parser.add_argument("--save-data", help="write the (teacher's) training pairs to this JSONL")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    try:
        if bool(args.teacher) != bool(args.prompts):
            raise ValueError("--teacher and --prompts go together: the teacher answers the prompts file.")
        if bool(args.data) == bool(args.teacher):
            raise ValueError("give exactly one source of training pairs: --data FILE, or --teacher URL --prompts FILE.")
        if args.teacher:
            prompts = [r["prompt"] for r in read_records(args.prompts, ("prompt",))]
            pairs = teacher_pairs(args.teacher, prompts, model=args.teacher_model)
        else:
            pairs = read_records(args.data, ("prompt", "response"))
        if args.save_data:
            write_jsonl(pairs, args.save_data)
        cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          warmup_steps=min(args.warmup_steps, args.steps), seed=args.seed)
        triples, dpo_cfg = None, None
        if args.dpo:
            triples = read_records(args.dpo, ("prompt", "chosen", "rejected"))
            dpo_cfg = TrainConfig(steps=args.dpo_steps, lr=args.dpo_lr, batch_size=args.batch_size,
                                  warmup_steps=min(args.warmup_steps, args.dpo_steps), seed=args.seed)
        base = resolve_checkpoint(args.base) if args.base else default_base_dir()
        manifest = graft(base, pairs, args.out, cfg, name=args.name, description=args.description,
                         budget=args.budget, keep_tuned=args.keep_tuned, dpo_triples=triples, dpo_cfg=dpo_cfg,
                         beta=args.beta, progress=not args.quiet, device=args.device,
                         sensitivity=not args.no_sensitivity)
    except ValueError as e:  # PackError, BuildError and bad input are ValueErrors with a sentence
        print(f"skillpack graft: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "name": manifest["name"], "total_bytes": manifest["total_bytes"],
                      "compression_ratio": manifest.get("compression_ratio")}))
    return 0
