"""`skillpack import-peft ADAPTER --base DIR --out FILE`: turn a PEFT LoRA adapter into a pack."""
from __future__ import annotations

import argparse
import sys

from skillpacks.hub import resolve_checkpoint
from skillpacks.peft_io import import_peft


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", required=True, help="the base the adapter was trained on: a folder or a Hugging Face model id")
    parser.add_argument("--out", required=True, help="the .skillpack file to write")
    parser.add_argument("--bits", default="8",
                        help="bit width, or comma-separated widths for rank tiers, largest singular values first "
                             "(e.g. 8,4); default 8")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size (power of two >= 8)")
    parser.add_argument("--name", help="pack name (default: the output file's name)")
    parser.add_argument("--description", default="", help="one line saying what the skill does")


def run(args: argparse.Namespace) -> int:
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        print(f"error: --bits {args.bits!r} is not a comma-separated list of integers (e.g. 8 or 8,4).", file=sys.stderr)
        return 2
    try:
        manifest = import_peft(args.adapter, resolve_checkpoint(args.base), args.out, bits=bits, group_size=args.group_size,
                               name=args.name, description=args.description)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    errors = [m["stats"]["rel_error"] for m in manifest["modules"]]
    print(f"wrote {args.out}: pack '{manifest['name']}', {len(errors)} modules, {manifest['total_bytes']} bytes, "
          f"largest relative error {max(errors):.4g}")
    return 0
