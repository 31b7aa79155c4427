"""The `skillpack` command line: one sub-command per module, imported only when used.

Each sub-command module defines `configure(parser)` (adds its arguments) and
`run(args) -> int` (the exit status), so `skillpack --help` stays fast and a missing
optional dependency only affects the command that needs it.

COMMANDS holds module paths as strings, not imports: the one place the library names packages above it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "build": ("skillpacks.commands.build", "build a SkillPack from a base and a fine-tuned checkpoint"),
    "inspect": ("skillpacks.commands.inspect", "print a pack's manifest as JSON"),
    "verify": ("skillpacks.commands.verify", "check a pack's integrity (and its base)"),
    "merge": ("skillpacks.commands.merge", "write base + pack as a dense Hugging Face checkpoint"),
    "import-peft": ("skillpacks.commands.import_peft", "turn a PEFT LoRA adapter into a pack"),
    "export-peft": ("skillpacks.commands.export_peft", "write a pack's low-rank part as a PEFT LoRA adapter"),
    "graft": ("skillpack_evals.commands.graft", "fine-tune a base on a skill's data, then build its pack"),
    "eval": ("skillpack_evals.commands.eval", "score base, fine-tune, packs and baselines on demo skills"),
    "fusion-eval": ("skillpack_evals.commands.fusion_eval", "score auto routing, oracle, best single pack and merges"),
    "router": ("skillpacks.commands.router", "train the router that picks packs for `model: auto`"),
    "serve": ("skillpack_server.cli", "run the OpenAI-compatible SkillPack server"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # the reader went away (`skillpack inspect x | head`): stop quietly, as `cat` would.
        # stdout now points at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="skillpack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"skillpack {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    return int(module.run(cmd_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
