"""`skillpack export-peft FILE --out DIR`: write a pack's low-rank part as a PEFT LoRA adapter."""
from __future__ import annotations

import argparse
import sys

from skillpacks.peft_io import export_peft


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .skillpack file")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the adapter")
    parser.add_argument("--base-name", help="base_model_name_or_path to record in adapter_config.json")


def run(args: argparse.Namespace) -> int:
    try:
        report = export_peft(args.file, args.out, base_model_name_or_path=args.base_name)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote a LoRA adapter (r={report['r']}, {len(report['exported'])} modules) to {args.out}")
    for m in report["not_exported"]:
        print(f"not exported ({m['method']} delta, no LoRA form): {m['name']}")
    return 0
