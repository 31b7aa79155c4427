"""No pickle is ever loaded: the packages' source has no pickle-capable loader (read as syntax,
not grepped as text), and pickle-bearing files are refused wherever a file enters: uploads,
the pack store at startup, the base checkpoint, a PEFT adapter."""
from __future__ import annotations

import ast
import io
import pickle
import zipfile
from pathlib import Path

import pytest

from skillpacks.checkpoint import CheckpointError, open_checkpoint
from skillpacks.format import PackError, verify_pack
from tests.server.test_api_common import ADMIN, serve, settings_for, snapshot

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "skillpacks", "kernels")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# dotted call -> why it is banned
BANNED_CALLS = {
    "torch.load": "unpickles", "torch.jit.load": "unpickles", "torch.serialization.load": "unpickles",
    "pandas.read_pickle": "unpickles", "pd.read_pickle": "unpickles", "numpy.load": "may unpickle",
    "np.load": "may unpickle",
}
SAFE_MODEL_SOURCES = ("use_safetensors", "gguf_file")  # from_pretrained kwargs that rule out a pickled .bin


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def pickle_uses(source: str, where: str) -> list[str]:
    """Every way `source` could load a pickle, as 'file:line what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"{where}:{node.lineno} imports torch.load")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name in BANNED_CALLS:
                found.append(f"{where}:{node.lineno} calls {name} ({BANNED_CALLS[name]})")
            if any(isinstance(v, ast.Constant) and v.value is True for k, v in kwargs.items() if k == "allow_pickle"):
                found.append(f"{where}:{node.lineno} passes allow_pickle=True")
            # a model class's from_pretrained falls back to a pickled pytorch_model.bin
            if (name.endswith(".from_pretrained") and "Tokenizer" not in name
                    and not any(k in kwargs for k in SAFE_MODEL_SOURCES)):
                found.append(f"{where}:{node.lineno} calls {name} without use_safetensors=True")
    return found


def test_the_packages_never_load_a_pickle():
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    found = [u for p in files for u in pickle_uses(p.read_text(), str(p.relative_to(REPO)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("source,what", [
    ("import pickle", "imports pickle"),
    ("from pickle import loads", "imports from pickle"),
    ("import cloudpickle as cp", "imports cloudpickle"),
    ("from torch import load", "imports torch.load"),
    ("import torch\ntorch.load('x.pt')", "calls torch.load"),
    ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", "calls np.load"),
    ("f(allow_pickle=True)", "allow_pickle=True"),
    ("AutoModelForCausalLM.from_pretrained(d, dtype=t)", "without use_safetensors"),
])
def test_the_scan_finds_each_kind_of_pickle_use(source, what):
    """The scan itself can fail: each banned form in a snippet is reported."""
    assert any(what in u for u in pickle_uses(source, "snippet.py")), pickle_uses(source, "snippet.py")


def test_the_scan_accepts_safe_loaders():
    safe = ("AutoTokenizer.from_pretrained(d)\nAutoModelForCausalLM.from_pretrained(d, use_safetensors=True)\n"
            "AutoModelForCausalLM.from_pretrained(d, gguf_file=f)\nnp.load_text = 1\nsafe_open(p, 'pt')")
    assert pickle_uses(safe, "snippet.py") == []


class Tripwire:
    """Unpickling this creates `marker`: if the file exists afterwards, something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickled_files(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps({"weights": Tripwire(marker)})
    torch_style = io.BytesIO()  # the layout torch.save writes: a zip holding data.pkl
    with zipfile.ZipFile(torch_style, "w") as z:
        z.writestr("archive/data.pkl", raw)
        z.writestr("archive/version", "3\n")
    return {"raw_pickle": raw, "torch_save_zip": torch_style.getvalue()}


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save_zip"])
def test_a_pickle_is_refused_everywhere_a_file_enters(pair, tmp_path, kind):
    marker = tmp_path / "unpickled.marker"
    data = pickled_files(marker)[kind]

    # as a pack file given to the reader
    (tmp_path / "p.skillpack").write_bytes(data)
    with pytest.raises(PackError):
        verify_pack(tmp_path / "p.skillpack")

    # as a base checkpoint with only pickled weights
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((pair.base / "config.json").read_text())
    (base / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(base)

    # as an upload, and as a file left in the store at startup
    store = tmp_path / "store"
    store.mkdir()
    (store / "left.skillpack").write_bytes(data)
    with serve(settings_for(pair, store)) as client:
        assert client.get("/admin/skillpacks", headers=ADMIN).json()["data"] == []
        before = snapshot(store)
        r = client.post("/admin/skillpacks", files={"file": ("model.bin", data)}, data={"name": "p"},
                        headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_pack", r.text
        assert snapshot(store) == before

    # as a PEFT adapter with only adapter_model.bin
    from skillpacks.peft_io import import_peft

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (adapter / "adapter_model.bin").write_bytes(data)
    with pytest.raises(Exception, match="pickle"):
        import_peft(adapter, pair.base, tmp_path / "out.skillpack")

    assert not marker.exists()
