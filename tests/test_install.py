"""The installed project imports cleanly wherever it runs: no import name of ours shadows a
dependency (Hugging Face's `kernels` is the one that bit), from the repo root or from any folder."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
DEMO_PACK = sorted((REPO / "packs").glob("*.skillpack"))[0]


def folder_of(package: str) -> Path:
    """The folder pyproject.toml maps an import name to (the longest mapped prefix wins)."""
    mapping = SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in mapping:
            return REPO / mapping[head] / Path(*parts[cut:])
    return REPO / Path(*parts)


def project_modules() -> list[str]:
    """Every module of every package pyproject.toml declares, by import name."""
    modules = []
    for package in SETUPTOOLS["packages"]:
        modules.append(package)
        for path in sorted(folder_of(package).glob("*.py")):
            if path.stem != "__init__":
                modules.append(f"{package}.{path.stem}")
    return modules


def python_folders() -> set[Path]:
    """Every folder of the four packages that holds Python source."""
    return {p.parent for top in ("skillpacks", "evals", "kernels", "server") for p in (REPO / top).rglob("*.py")}


def test_every_source_folder_is_a_declared_package():
    # a folder missing from the list is left out of a (non-editable) wheel
    assert python_folders() == {folder_of(p) for p in SETUPTOOLS["packages"]}


def test_no_import_name_of_ours_is_a_dependencys():
    ours = {p.split(".")[0] for p in SETUPTOOLS["packages"]} | {"tests", "bench", "testbed"}
    # a bench script run as `python bench/x.py` puts bench/ first on sys.path: its file names count
    ours |= {p.stem for p in (REPO / "bench").glob("*.py")}
    others = {name: dists for name, dists in importlib.metadata.packages_distributions().items()
              if set(dists) != {"skillpack-server"}}
    clashes = {name: others[name] for name in ours if name in others}
    assert not clashes, f"import names shared with installed distributions: {clashes}"
    assert not (REPO / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder a `kernels` package from the repo root, shadowing Hugging Face's"


IMPORT_ALL = """
import importlib, sys
import transformers.integrations.hub_kernels, peft, kernels
assert 'site-packages' in (kernels.__file__ or ''), f'kernels resolved to {kernels.__file__}'
for name in sys.argv[1:]:
    importlib.import_module(name)
print('imported', len(sys.argv) - 1)
"""


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_everything_imports_in_one_interpreter(where, tmp_path):
    cwd = REPO if where == "repo" else tmp_path
    modules = project_modules()
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL, *modules], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["imported", str(len(modules))]


def skillpack_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "skillpack"
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})


def test_cli_runs_outside_the_repo(tmp_path):
    helped = skillpack_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "build" in helped.stdout
    inspected = skillpack_cli("inspect", str(DEMO_PACK), cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert f'"name": "{DEMO_PACK.stem}"' in inspected.stdout


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    # `skillpack inspect x | head -1`: the reader goes away after one line
    script = Path(sys.executable).parent / "skillpack"
    done = subprocess.run(f"'{script}' inspect '{DEMO_PACK}' | head -c 1 > /dev/null; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr == ""
