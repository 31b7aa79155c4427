"""`skillpack merge FILE --base DIR --out DIR`: write base + pack as a dense HF checkpoint."""
from __future__ import annotations

import argparse
import sys

from skillpacks.hub import resolve_checkpoint
from skillpacks.merge import DTYPE_NAMES, merge_pack


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .skillpack file")
    parser.add_argument("--base", required=True, help="the base the pack was built for: a folder or a Hugging Face model id")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="merged weights' dtype (default: the base's)")


def run(args: argparse.Namespace) -> int:
    try:
        out = merge_pack(args.file, resolve_checkpoint(args.base), args.out, dtype=args.dtype)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged checkpoint written to {out}")
    return 0
