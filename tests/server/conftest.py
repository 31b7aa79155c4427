"""The API tests' fixtures: the tiny llama pair (and a second base), a store with two of its
packs, and the app served over that store (helpers in tests/server/test_api_common.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed.tiny_models import build_tiny_pair
from tests.server.test_api_common import build_pack, serve, settings_for


@pytest.fixture(scope="module")
def llama(tiny_root, tiny_tokenizer):
    """The tied-embedding llama pair (only the pairs a test needs get built)."""
    return build_tiny_pair("llama", tiny_root, tiny_tokenizer)


@pytest.fixture(scope="module")
def other_base(tiny_root, tiny_tokenizer):
    """A second base with the same shapes but other weights and an untied head."""
    return build_tiny_pair("llama_untied", tiny_root, tiny_tokenizer)


@pytest.fixture(scope="module")
def packs_dir(llama, tmp_path_factory) -> Path:
    """A store with two packs of the llama pair: `skill` (the delta) and `skill2x` (twice it)."""
    folder = tmp_path_factory.mktemp("packs")
    build_pack(llama, folder / "skill.skillpack", "skill")
    build_pack(llama, folder / "skill2x.skillpack", "skill2x", scale=2.0)
    return folder


@pytest.fixture(scope="module")
def client(llama, packs_dir):
    with serve(settings_for(llama, packs_dir)) as c:
        yield c
