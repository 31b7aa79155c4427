"""Demo skill: two-step arithmetic `(a + b) * c - d`, answered with its working and the result.

The response shows the intermediate step (`(3 + 4) * 5 - 6 = 7 * 5 - 6 = 29`) so a
135M model can learn it from a short fine-tune; the scorer reads only the final integer.
"""
from __future__ import annotations

import random
import re

from skillpacks.skills.examples import Example

name = "arithmetic"
max_new_tokens = 32

_INT = re.compile(r"-?\d+")


def generate(rng: random.Random) -> Example:
    a, b, c, d = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 30)
    s = a + b
    prompt = f"Compute ({a} + {b}) * {c} - {d}. Reply with the working and the result."
    response = f"({a} + {b}) * {c} - {d} = {s} * {c} - {d} = {s * c - d}"
    return Example(prompt, response)


def final_integer(text: str) -> int | None:
    """The last integer written in `text`, or None when there is none."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def score(output: str, example: Example) -> bool:
    return final_integer(output) is not None and final_integer(output) == final_integer(example.response)
