"""Fusion fixtures: one tiny base with three packs, each with example prompts of a demo skill.

The packs are the tiny pair's real fine-tune delta and two seeded deltas four times its
norm (so every pack's outputs differ clearly); their sidecars hold the prompts of the
three demo skills, whose held-out prompts the router must tell apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from skillpack_evals.skills import demo_split
from skillpacks.checkpoint import open_checkpoint
from skillpacks.classifier import TrainConfig, build_classifier, examples_path, hf_feature_fn, write_examples
from skillpacks.fingerprint import base_fingerprint
from testbed.tiny_models import build_tiny_pair
from tests.server.test_runtime import noise_delta, tuned_delta, write_test_pack

SKILL_OF = {"arith": "arithmetic", "json": "json_extract", "sql": "sql"}
N_EXAMPLES, N_HELD_OUT = 40, 12


@dataclass
class FusionSetup:
    pair: object
    fingerprint: dict
    packs_dir: Path
    paths: dict[str, Path]
    held_out: dict[str, list[str]]  # pack name -> prompts of its skill never used for training
    dense: dict[str, dict[str, torch.Tensor]]  # pack name -> the dense delta it was built from


def write_pack_with_examples(folder: Path, name: str, base: Path, dense: dict, fp: dict, skill: str,
                             seed: int = 0) -> Path:
    path = write_test_pack(folder / f"{name}.skillpack", name, base, dense, fp)
    train, _ = demo_split(skill, n_train=N_EXAMPLES, n_test=N_HELD_OUT, seed=seed)
    write_examples(examples_path(folder, name), [e.prompt for e in train])
    return path


@pytest.fixture(scope="session")
def fusion(tiny_root, tiny_tokenizer, tmp_path_factory) -> FusionSetup:
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    folder = tmp_path_factory.mktemp("fusion-packs")
    fp = base_fingerprint(open_checkpoint(pair.base))
    real = tuned_delta(pair.base, pair.tuned)
    loud = {n: 4 * d for n, d in real.items()}
    dense = {"arith": real, "json": noise_delta(loud, 21), "sql": noise_delta(loud, 22)}
    paths = {n: write_pack_with_examples(folder, n, pair.base, d, fp, SKILL_OF[n]) for n, d in dense.items()}
    held_out = {n: [e.prompt for e in demo_split(SKILL_OF[n], n_train=N_EXAMPLES, n_test=N_HELD_OUT)[1]]
                for n in dense}
    return FusionSetup(pair, fp, folder, paths, held_out, dense)


@pytest.fixture(scope="session")
def hf_base(fusion):
    return transformers.AutoModelForCausalLM.from_pretrained(fusion.pair.base, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def built_router(fusion, hf_base, tiny_tokenizer):
    """The router over the three packs, written to the packs folder as the server expects."""
    return build_classifier(fusion.packs_dir, tiny_tokenizer, hf_feature_fn(hf_base), fusion.fingerprint["weights_sha256"],
                        TrainConfig())
