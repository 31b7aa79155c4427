"""Shared by the scale tests: the tied llama pair, pack files built from it, the stores a
cluster or replica serves and the single-process server their answers are checked against."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.tiny_models import TinyPair, build_tiny_pair
from tests.server.test_api_common import build_pack, serve, settings_for

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


@pytest.fixture(scope="module")
def stores(pack_files, tmp_path_factory) -> tuple[Path, Path]:
    """A shared store with `skill` and `skill2x`, and the reference server's own folder with all three packs
    (so a test can upload `unskill` through the replicas and compare)."""
    shared, reference = tmp_path_factory.mktemp("shared"), tmp_path_factory.mktemp("reference")
    for name, path in pack_files.items():
        shutil.copy(path, reference / path.name)
        if name != "unskill":
            shutil.copy(path, shared / path.name)
    return shared, reference


@pytest.fixture(scope="module")
def reference(llama, stores):
    """The plain single-process server over the reference folder: the oracle for every replica's answer."""
    with serve(settings_for(llama, stores[1])) as client:
        yield client
