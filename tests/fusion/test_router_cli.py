"""`skillpack router build` on a folder of tiny packs: writes the router next to them,
versions it, stores examples given on the command line, and fails with a sentence."""
from __future__ import annotations

import json
import shutil

from skillpacks.cli import main
from skillpacks.classifier import CLASSIFIER_FILE, load_classifier, read_examples


def test_router_build_writes_versions_and_stores_examples(fusion, tmp_path, capsys):
    folder = tmp_path / "packs"
    folder.mkdir()
    for name in ("json", "sql"):
        shutil.copy(fusion.packs_dir / f"{name}.skillpack", folder)
        shutil.copy(fusion.packs_dir / f"{name}.examples.jsonl", folder)
    shutil.copy(fusion.packs_dir / "arith.skillpack", folder)  # no sidecar: not routable
    args = ["router", "build", "--base", str(fusion.pair.base), "--packs", str(folder), "--max-examples", "12",
            "--steps", "60", "--device", "cpu"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["labels"] == ["json", "sql"]
    router = load_classifier(folder / CLASSIFIER_FILE)
    assert router.manifest["packs"]["sql"]["examples"] == 12 and router.manifest["hidden"] == 64

    extra = tmp_path / "arith.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"Compute ({i} + 1) * 2 - 3."}) + "\n" for i in range(8)))
    assert main(args + ["--examples", f"arith={extra}"]) == 0
    assert read_examples(folder / "arith.examples.jsonl") == [f"Compute ({i} + 1) * 2 - 3." for i in range(8)]
    again = load_classifier(folder / CLASSIFIER_FILE)
    assert again.manifest["version"] == 2 and again.labels == ["arith", "json", "sql"]


def test_router_build_errors(fusion, tmp_path, capsys):
    base = ["router", "build", "--base", str(fusion.pair.base), "--device", "cpu"]
    assert main(base + ["--packs", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "packs folder" in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(base + ["--packs", str(empty)]) == 1
    assert "no pack in" in capsys.readouterr().err
    assert main(base + ["--packs", str(empty), "--examples", "nope"]) == 1
    assert "expected NAME=FILE" in capsys.readouterr().err
    assert main(base + ["--packs", str(empty), "--examples", "ghost=x.jsonl"]) == 1
    assert "there is no pack" in capsys.readouterr().err
