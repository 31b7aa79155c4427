"""Demo skill: multi-step arithmetic, a running total over a chain of additions and subtractions.

Prompt: "Start with 23. Add 7, then subtract 4, then add 9. ..." The response writes every
step with its running total (`23 + 7 = 30, 30 - 4 = 26, 26 + 9 = 35. The result is 35.`),
so each step is one small addition or subtraction that a 135M model can learn to chain
from a short fine-tune; the scorer reads only the final integer. (An earlier version,
`(a + b) * c - d`, was not learned by a 200-step fine-tune: the 2-digit product was the
step the model could not do; docs/RESULTS.md.)
"""
from __future__ import annotations

import random
import re

from skillpack_evals.skills.examples import Example

name = "arithmetic"
max_new_tokens = 64  # four steps and the result take ~50 tokens

_INT = re.compile(r"-?\d+")
_WORDS = {"+": "add", "-": "subtract"}


def generate(rng: random.Random) -> Example:
    total = rng.randint(10, 60)
    n_steps = rng.randint(3, 4)
    steps: list[tuple[str, int]] = []
    working = []
    for _ in range(n_steps):
        op = rng.choice("+-") if total > 9 else "+"  # keep every running total positive
        x = rng.randint(2, 9)
        new = total + x if op == "+" else total - x
        working.append(f"{total} {op} {x} = {new}")
        steps.append((op, x))
        total = new
    said = ", then ".join(f"{_WORDS[op]} {x}" for op, x in steps)
    start = int(working[0].split()[0])
    prompt = f"Start with {start}. {said[0].upper()}{said[1:]}. What is the result? Show each step."
    response = ", ".join(working) + f". The result is {total}."
    return Example(prompt, response)


def final_integer(text: str) -> int | None:
    """The last integer written in `text`, or None when there is none."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def score(output: str, example: Example) -> bool:
    got = final_integer(output)
    return got is not None and got == final_integer(example.response)
