"""The library's `skillpack` sub-commands, one module each (skillpacks/cli.py lists every command), and the
argument types they share with skillpack_evals.commands."""
from __future__ import annotations

import argparse

from skillpacks.budget import parse_budget


def budget_arg(text: str) -> float:
    """argparse type of every `--budget`: '1/16' or '0.0625' (skillpacks.budget.parse_budget)."""
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
