"""`--base ORG/NAME`: a Hugging Face model id resolved from huggingface_hub's own cache, offline.

The cache is written by the test the way huggingface_hub lays it out
(`models--ORG--NAME/{blobs,refs,snapshots}`, snapshot files symlinked to their blobs), so
the resolver, the checkpoint reader and the commands meet exactly what a real download leaves.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from skillpack_server.app import base_dir
from skillpack_server.settings import Settings
from skillpacks.checkpoint import CheckpointError, open_checkpoint
from skillpacks.cli import main as cli_main
from skillpacks.hub import checkpoint_name, is_hub_id, resolve_checkpoint
from testbed.tiny_models import build_tiny_pair
from tests.server.test_serve_command import one_line_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder`'s files out as huggingface_hub caches a download of `repo_id` at COMMIT; returns
    the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob), snapshot / f.name)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_root, tiny_tokenizer):
    """An offline hub cache holding the tiny llama base as `tiny-org/tiny-llama`."""
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    cache = tmp_path / "hub"
    snapshot = write_hub_cache(cache, "tiny-org/tiny-llama", pair.base)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return pair, snapshot


def test_a_cached_model_id_resolves_to_its_snapshot_and_reads_like_the_folder(hub):
    pair, snapshot = hub
    assert resolve_checkpoint("tiny-org/tiny-llama") == snapshot
    assert (snapshot / "model.safetensors").is_symlink()
    via_hub, direct = open_checkpoint(snapshot), open_checkpoint(pair.base)
    assert via_hub.names() == direct.names()
    assert checkpoint_name(snapshot) == "tiny-llama"  # what the server calls the model, not the commit


def test_commands_take_the_model_id_as_base(hub, tmp_path, capsys):
    pair, _ = hub
    out = tmp_path / "p.skillpack"
    assert cli_main(["build", "--base", "tiny-org/tiny-llama", "--tuned", str(pair.tuned), "--out", str(out),
                     "--quiet"]) == 0, capsys.readouterr().err
    assert cli_main(["verify", str(out), "--base", "tiny-org/tiny-llama"]) == 0
    assert "matches base tiny-org/tiny-llama" in capsys.readouterr().out
    assert cli_main(["merge", str(out), "--base", "tiny-org/tiny-llama", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m" / "model.safetensors").is_symlink()
    assert base_dir(Settings(base="tiny-org/tiny-llama")) == resolve_checkpoint("tiny-org/tiny-llama")


def test_an_uncached_id_is_one_sentence_naming_it(hub, capsys, tmp_path):
    with pytest.raises(ValueError, match="model tiny-org/absent is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_checkpoint("tiny-org/absent")
    assert cli_main(["verify", "x.skillpack", "--base", "tiny-org/absent"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'tiny-org/absent'" in err
    err = one_line_error(["--base", "tiny-org/absent", "--packs", str(tmp_path / "store")], capsys)  # serve
    assert "tiny-org/absent is not in the Hugging Face cache" in err and "--base or SKILLPACK_BASE" in err
    with pytest.raises(ValueError, match="nor a Hugging Face model id of the form ORG/NAME"):
        resolve_checkpoint("no/such/folder")


def test_an_existing_folder_wins_over_a_model_id(hub, tmp_path, monkeypatch):
    pair, _ = hub
    local = tmp_path / "work" / "tiny-org" / "tiny-llama"
    shutil.copytree(pair.tuned, local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_checkpoint("tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")
    assert resolve_checkpoint(str(local)) == local


@pytest.mark.parametrize("value, expected", [
    ("Qwen/Qwen3-0.6B", True), ("google/gemma-2-2b-it", True), ("a/b", True),
    ("gpt2", False), ("a/b/c", False), ("./a/b", False), ("/abs/path", False), ("org/-bad", False),
    ("org/na--me", False), ("org/na..me", False),
])
def test_what_counts_as_a_model_id(value, expected):
    assert is_hub_id(value) is expected


def test_a_shard_named_outside_the_folder_is_refused(hub, tmp_path):
    """Symlinked shards are read (the cache's own layout, above); a name that leaves the folder is not."""
    pair, _ = hub
    folder = tmp_path / "escape"
    folder.mkdir()
    (folder / "config.json").write_text((pair.base / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="expected a .safetensors file inside"):
        open_checkpoint(folder)
