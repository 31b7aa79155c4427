"""Write a demo skill's seeded split as JSONL: python -m skillpack_evals.skills SKILL {train,test} OUT."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from skillpack_evals.skills import N_TEST, N_TRAIN, SPLIT_SEED, SKILLS, demo_split
from skillpacks.jsonl import write_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skillpack_evals.skills", description=__doc__.splitlines()[0])
    p.add_argument("skill", choices=sorted(SKILLS))
    p.add_argument("split", choices=["train", "test"])
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = p.parse_args(argv)
    train, test = demo_split(args.skill, args.n_train, args.n_test, args.seed)
    write_jsonl([asdict(e) for e in (train if args.split == "train" else test)], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
