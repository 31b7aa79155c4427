"""`skillpack build`: compress tuned − base into a .skillpack file (skillpacks/build.py)."""
from __future__ import annotations

import argparse
import sys

import torch

from skillpacks.build import DEFAULT_BUDGET, PRESETS, build_pack
from skillpacks.commands import budget_arg
from skillpacks.hub import resolve_checkpoint
from skillpacks.sensitivity import DEFAULT_EXAMPLES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base checkpoint: a folder (safetensors) or a Hugging Face "
                        "model id ORG/NAME, read from the hub cache")
    parser.add_argument("--tuned", required=True, help="fine-tuned checkpoint (folder or model id) with the base's tensors")
    parser.add_argument("--out", required=True, help="pack file to write, e.g. math.skillpack")
    parser.add_argument("--name", help="pack name (default: the output file's name without extension)")
    parser.add_argument("--description", default="", help="one line saying what the skill does")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--budget", type=budget_arg, default=DEFAULT_BUDGET,
                      help="file size as a fraction of the fp16 delta, header included (default 1/16)")
    size.add_argument("--preset", choices=sorted(PRESETS), help="a fixed per-module recipe instead of a budget")
    parser.add_argument("--calib", help="calibration text (one per line, or .jsonl with \"text\") for GPTQ")
    parser.add_argument("--sensitivity", metavar="JSONL",
                        help="records the skill is about ({\"prompt\", \"response\"} or {\"text\"} per line, e.g. the "
                             "fine-tune's training data): ranks are weighed by their measured effect on the outputs")
    parser.add_argument("--sensitivity-examples", type=int, default=DEFAULT_EXAMPLES, metavar="N",
                        help=f"records of --sensitivity to run (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--report", help="write the build report (sizes, errors per module) to this JSON file")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); on a "
                        "machine shared with other jobs, 1 avoids threads spinning against each other")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary table")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            print(f"skillpack build: --threads {args.threads} is out of range; expected 1 to 1024.", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        base, tuned = resolve_checkpoint(args.base), resolve_checkpoint(args.tuned, "tuned")
        manifest = build_pack(base, tuned, args.out, name=args.name, description=args.description,
                              budget=args.budget, preset=args.preset, calib=args.calib, report=args.report,
                              progress=not args.quiet, sensitivity=args.sensitivity,
                              sensitivity_examples=args.sensitivity_examples)
    except (ValueError, FileNotFoundError) as e:  # BuildError, CheckpointError, PackError, bad calib file
        print(f"skillpack build: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: pack '{manifest['name']}', {len(manifest['modules'])} modules")
    return 0
