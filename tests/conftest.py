"""Shared fixtures: tiny (base, tuned) model pairs written once per test session."""
import os

# Triton reads this when its first @triton.jit decorator runs: set it before any import.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from testbed.tiny_models import ARCHS, TinyPair, build_tiny_pair, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def user_folders(tmp_path_factory):
    """XDG data and config homes of the test session's own: nothing a test runs (a pack store, a
    generated admin token) lands in the real user's folders."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
            (root / variable).mkdir()
            patch.setenv(variable, str(root / variable))
        yield root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", params=sorted(ARCHS))
def tiny_pair(request, tiny_root, tiny_tokenizer) -> TinyPair:
    """Each architecture's (base, tuned) pair; tests using it run once per architecture."""
    return build_tiny_pair(request.param, tiny_root, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_pairs(tiny_root, tiny_tokenizer) -> dict[str, TinyPair]:
    return {a: build_tiny_pair(a, tiny_root, tiny_tokenizer) for a in ARCHS}
