"""The demo skills: seeded generators of (prompt, response) pairs and their scorers, by name."""
from __future__ import annotations

from types import ModuleType

from skillpack_evals.skills import arithmetic, json_extract, sql
from skillpack_evals.skills.examples import Example, Skill, make_split

SKILLS: dict[str, ModuleType] = {m.name: m for m in (arithmetic, json_extract, sql)}

# The demo packs' fixed splits (scripts/make_demo_packs.sh and `skillpack eval` use these).
SPLIT_SEED, N_TRAIN, N_TEST = 0, 700, 50


def get_skill(name: str) -> ModuleType:
    """The skill module called `name`; a ValueError lists the known ones otherwise."""
    if name not in SKILLS:
        raise ValueError(f"unknown skill '{name}'; expected one of {sorted(SKILLS)}.")
    return SKILLS[name]


def demo_split(name: str, n_train: int = N_TRAIN, n_test: int = N_TEST,
               seed: int = SPLIT_SEED) -> tuple[list[Example], list[Example]]:
    """The seeded (train, held-out test) split of skill `name`."""
    return make_split(get_skill(name).generate, n_train, n_test, seed)


__all__ = ["SKILLS", "Example", "Skill", "demo_split", "get_skill", "make_split"]
