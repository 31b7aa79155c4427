"""`skillpack router build --base DIR --packs DIR [--examples NAME=FILE ...] [--out FILE]`: train the pack router."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpacks.checkpoint import open_checkpoint, pick_device
from skillpacks.classifier import (
    CLASSIFIER_FILE, ClassifierError, TrainConfig, build_classifier, examples_path, hf_feature_fn, read_examples,
    write_examples,
)
from skillpacks.default_base import default_base_dir
from skillpacks.fingerprint import weights_sha256
from skillpacks.hub import resolve_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="train a router over the packs that have example prompts")
    build.add_argument("--base", help="the base checkpoint folder or Hugging Face model id (default: the converted "
                       "SmolLM2-135M-Instruct)")
    build.add_argument("--packs", required=True, help="the folder of NAME.skillpack files (and NAME.examples.jsonl)")
    build.add_argument("--examples", action="append", default=[], metavar="NAME=FILE",
                       help="a JSONL file of {'prompt': ...} lines to store as pack NAME's examples sidecar "
                            "(repeatable; replaces an existing sidecar)")
    build.add_argument("--out", help=f"the router file (default: PACKS/{CLASSIFIER_FILE}, where the server looks)")
    build.add_argument("--max-examples", type=int, default=256, help="examples used per pack (default 256)")
    build.add_argument("--hidden", type=int, default=64, help="hidden units of the FFN; 0 = logistic (default 64)")
    build.add_argument("--steps", type=int, default=300, help="full-batch training steps (default 300)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", help="cpu / cuda (default: cuda when present)")


def _store_examples(packs: Path, specs: list[str]) -> None:
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ClassifierError(f"--examples {spec!r}: expected NAME=FILE.")
        if not (packs / f"{name}.skillpack").is_file():
            raise ClassifierError(f"--examples {spec!r}: there is no pack {packs / (name + '.skillpack')}.")
        write_examples(examples_path(packs, name), read_examples(file))


def run(args: argparse.Namespace) -> int:
    packs = Path(args.packs)
    try:
        if args.base is None:
            args.base = default_base_dir()
        args.base = resolve_checkpoint(args.base)
        cfg = TrainConfig(hidden=args.hidden, steps=args.steps, seed=args.seed)
        _store_examples(packs, args.examples)
        tokenizer = AutoTokenizer.from_pretrained(args.base)
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, use_safetensors=True)
        model = model.to(pick_device(args.device)).eval()
        router, out = build_classifier(packs, tokenizer, hf_feature_fn(model), weights_sha256(open_checkpoint(args.base)),
                                   cfg, max_examples=args.max_examples, out=args.out)
    except (ClassifierError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = router.manifest
    print(json.dumps({"router": str(out), "version": m["version"], "labels": m["labels"],
                      "training": m["training"]}, indent=1))
    return 0
