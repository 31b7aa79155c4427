"""One module per `skillpack` sub-command (see skillpacks/cli.py), and their shared argument types."""
from __future__ import annotations

import argparse


def budget_arg(text: str) -> float:
    """argparse type of every `--budget`: '1/16' or '0.0625' (skillpacks.evaluate.parse_budget)."""
    from skillpacks.evaluate import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
