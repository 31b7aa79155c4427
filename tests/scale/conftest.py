"""Shared by the scale tests: the tied llama pair, pack files built from it, and the settings a replica gets."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.test_api_common import build_pack, llama  # noqa: F401  (fixture re-exported)

# name -> scale of the pair's real delta: three packs that steer the model apart
PACK_SCALES = {"skill": 1.0, "skill2x": 2.0, "unskill": -1.0}


@pytest.fixture(scope="session")
def pack_files(tiny_root, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """One built pack file per PACK_SCALES entry, outside any store (copy them where needed)."""
    from tests.tiny_models import build_tiny_pair

    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    folder = tmp_path_factory.mktemp("scale-packs")
    return {name: build_pack(pair, folder / f"{name}.skillpack", name, scale) for name, scale in PACK_SCALES.items()}
