"""Demo-skill examples: the (prompt, response) record and seeded train/test splits."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Protocol

MAX_EXAMPLES = 1_000_000  # bound on any split


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


class Skill(Protocol):
    """What every demo skill module provides (see evals/skills/__init__.py)."""

    name: str
    max_new_tokens: int

    def generate(self, rng: random.Random) -> Example: ...

    def score(self, output: str, example: Example) -> bool: ...


def make_split(generate: Callable[[random.Random], Example], n_train: int, n_test: int,
               seed: int) -> tuple[list[Example], list[Example]]:
    """Draw distinct examples with `seed`; the first `n_test` distinct prompts are the test set.

    Prompts are unique across both sets, so no test prompt is ever seen in training.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test > MAX_EXAMPLES:
        raise ValueError(f"split sizes n_train={n_train}, n_test={n_test} must be >= 0 and sum to <= {MAX_EXAMPLES}.")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    attempts, limit = 0, 50 * (n_train + n_test) + 1000
    while len(out) < n_train + n_test:
        attempts += 1
        if attempts > limit:
            raise ValueError(f"could only draw {len(out)} distinct examples of {n_train + n_test} asked; "
                             "the generator's space is too small for this split.")
        ex = generate(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[n_test:], out[:n_test]
