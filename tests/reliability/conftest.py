"""Fixtures for the reliability tests: the tiny llama pair and a few packs built on it, once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.load import STABLE, noise_pack
from testbed.tiny_models import TinyPair, build_tiny_pair
from tests.server.test_api_common import build_pack


@pytest.fixture(scope="session")
def pair(tiny_root, tiny_tokenizer) -> TinyPair:
    # SKILLPACK_TINY_ROOT keeps the tiny models between runs while iterating on these tests
    return build_tiny_pair("llama", Path(os.environ.get("SKILLPACK_TINY_ROOT", tiny_root)), tiny_tokenizer)


@pytest.fixture(scope="session")
def pack_paths(pair, tmp_path_factory) -> dict[str, Path]:
    """`skill` (the real fine-tune's delta) and the load test's seeded packs, all on the llama base."""
    folder = tmp_path_factory.mktemp("reliability-packs")
    paths = {"skill": build_pack(pair, folder / "skill.skillpack", "skill")}
    for k, name in enumerate(STABLE):
        paths[name] = noise_pack(pair.base, folder / f"{name}.skillpack", name, seed=100 + k)
    return paths


@pytest.fixture(scope="session")
def pack_bytes(pack_paths) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in pack_paths.items()}
