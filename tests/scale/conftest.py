"""Shared by the scale tests: the tied llama pair, pack files built from it, and the settings a replica gets."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.test_api_common import build_pack
from tests.tiny_models import TinyPair, build_tiny_pair

# name -> scale of the pair's real delta: three packs that steer the model apart
PACK_SCALES = {"skill": 1.0, "skill2x": 2.0, "unskill": -1.0}


@pytest.fixture(scope="session")
def llama(tiny_root, tiny_tokenizer) -> TinyPair:
    """The tied-embedding llama pair every replica serves."""
    return build_tiny_pair("llama", tiny_root, tiny_tokenizer)


@pytest.fixture(scope="session")
def pack_files(llama, tmp_path_factory) -> dict[str, Path]:
    """One built pack file per PACK_SCALES entry, outside any store (copy them where needed)."""
    folder = tmp_path_factory.mktemp("scale-packs")
    return {name: build_pack(llama, folder / f"{name}.skillpack", name, scale) for name, scale in PACK_SCALES.items()}
