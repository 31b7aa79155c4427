"""`skillpack verify FILE [--base DIR]`: check a pack fully; exit 1 with the reason if it is bad."""
from __future__ import annotations

import argparse
import sys

from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import verify_pack
from skillpacks.hub import resolve_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the .skillpack file")
    parser.add_argument("--base", help="base checkpoint (folder or Hugging Face model id): also check the pack "
                        "was built for it")


def run(args: argparse.Namespace) -> int:
    try:
        fp = base_fingerprint(open_checkpoint(resolve_checkpoint(args.base))) if args.base else None
        manifest = verify_pack(args.file, fp)
    except ValueError as e:  # PackError and CheckpointError are both ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    against = f", matches base {args.base}" if args.base else ""
    print(f"ok: pack '{manifest['name']}', {len(manifest['modules'])} modules, {manifest['total_bytes']} bytes "
          f"(ratio {manifest['compression_ratio']} vs the fp16 delta){against}")
    return 0
