"""`skillpack inspect FILE`: print a pack's manifest (read from its header only) as JSON."""
from __future__ import annotations

import argparse
import json
import sys

from skillpacks.format import read_manifest


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .skillpack file")
    parser.add_argument("--modules", action="store_true",
                        help="print one line per module (name, method, rank/nnz, bytes) instead of the JSON")
    parser.add_argument("--full", action="store_true",
                        help="include the base model's tensor list (long) in the JSON")


def module_line(m: dict) -> str:
    layout = m["layout"]
    if m["method"] == "lowrank":
        detail = f"rank {layout['rank']} bits " + "/".join(f"{t['bits']}x{t['rank']}" for t in layout["tiers"])
    elif m["method"] == "sparse":
        detail = f"nnz {layout['nnz']}"
    else:
        detail = "exact"
    return f"{m['name']}\t{m['kind']}\t{m['method']}\t{'x'.join(map(str, m['shape']))}\t{detail}"


def run(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.file)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.modules:
        for m in manifest["modules"]:
            print(module_line(m))
        return 0
    if not args.full:
        manifest["base"] = {k: v for k, v in manifest["base"].items() if k != "tensors"}
    print(json.dumps(manifest, indent=2))
    return 0
