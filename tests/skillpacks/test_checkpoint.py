"""Checkpoint folders read lazily and exactly; the base fingerprint against a plain recomputation."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from skillpacks.checkpoint import CheckpointError, open_checkpoint, read_header, read_tensors, write_safetensors
from skillpacks.fingerprint import base_fingerprint, check_base
from skillpacks.format import PackError


def test_names_shapes_dtypes_and_tensors_match_safetensors(tiny_pair):
    ckpt = open_checkpoint(tiny_pair.base)
    want = load_file(str(tiny_pair.base / "model.safetensors"))
    assert ckpt.names() == sorted(want)
    for name, t in want.items():
        assert ckpt.shape(name) == tuple(t.shape)
        assert ckpt.dtype(name) == t.dtype
        assert torch.equal(ckpt.get(name), t)
    assert ckpt.config["model_type"] == json.loads((tiny_pair.base / "config.json").read_text())["model_type"]
    assert ckpt.path == tiny_pair.base


def _raw_safetensors(path, tensors: dict) -> None:
    """A safetensors file laid out in the given order with no alignment padding (the format
    allows it; safetensors' own writer aligns, so misaligned spans need a hand-made file)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
             torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL"}
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def test_read_tensors_reads_every_dtype_and_alignment_like_safetensors(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "odd_bytes": torch.randint(0, 255, (3, 5), generator=g, dtype=torch.uint8),  # 15 bytes: what follows is misaligned
        "half": torch.randn(4, 6, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "one_byte": torch.ones(1, dtype=torch.uint8),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "raw.safetensors"
    _raw_safetensors(path, tensors)
    data, got = read_tensors(read_header(path))
    assert data.numel() == path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    with safe_open(str(path), framework="pt") as f:
        for name in tensors:
            want = f.get_tensor(name)
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name
            assert torch.equal(got[name].view(torch.uint8), tensors[name].view(torch.uint8)), name


def test_tied_embeddings_follow_config_and_files(tiny_pairs):
    assert open_checkpoint(tiny_pairs["llama"].base).tied_embeddings
    for arch in ("llama_untied", "qwen2", "mistral"):
        assert not open_checkpoint(tiny_pairs[arch].base).tied_embeddings


def test_sharded_checkpoint_reads_like_the_single_file(tiny_pairs, tmp_path):
    pair = tiny_pairs["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single, sharded = open_checkpoint(pair.base), open_checkpoint(tmp_path / "sharded")
    assert single.names() == sharded.names()
    for name in single.names():
        assert torch.equal(single.get(name), sharded.get(name))
    assert base_fingerprint(single)["weights_sha256"] == base_fingerprint(sharded)["weights_sha256"]


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle files are never loaded"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("make,match", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text("[1]"), "expected an object"),
])
def test_missing_or_bad_config(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path)


def test_index_pointing_outside_the_folder_is_refused(tiny_pairs, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(tiny_pairs["llama"].base, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="inside"):
        open_checkpoint(folder)


def plain_weights_hash(folder) -> str:
    """The documented definition, computed from fully loaded tensors."""
    digest = hashlib.sha256()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    st_names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, st_names[t.dtype], list(t.shape)]).encode() + b"\n")
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_fingerprint_matches_the_definition(tiny_pair):
    fp = base_fingerprint(open_checkpoint(tiny_pair.base))
    assert fp["weights_sha256"] == plain_weights_hash(tiny_pair.base)
    cfg = json.loads((tiny_pair.base / "config.json").read_text())
    assert fp["architecture"] == cfg["architectures"][0] and fp["model_type"] == cfg["model_type"]
    assert fp["config"]["hidden_size"] == 64 and fp["config"]["num_key_value_heads"] == 2
    assert fp["tensors"]["model.embed_tokens.weight"] == [cfg["vocab_size"], 64]


def test_one_changed_weight_changes_the_hash(tiny_pairs, tmp_path):
    src = tiny_pairs["llama"].base
    folder = tmp_path / "c"
    shutil.copytree(src, folder)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"][3] += 1e-3
    save_file(tensors, str(folder / "model.safetensors"))
    a, b = base_fingerprint(open_checkpoint(src)), base_fingerprint(open_checkpoint(folder))
    assert a["tensors"] == b["tensors"] and a["weights_sha256"] != b["weights_sha256"]
    with pytest.raises(PackError, match="weights differ"):
        check_base(a, b)
    check_base(a, base_fingerprint(open_checkpoint(src)))


def test_check_base_names_the_difference(tiny_pairs):
    fp = base_fingerprint(open_checkpoint(tiny_pairs["qwen2"].base))
    other = json.loads(json.dumps(fp))
    other["tensors"]["model.norm.weight"] = [65]
    with pytest.raises(PackError, match=r"'model.norm.weight' has shape \[65\]"):
        check_base(fp, other)
    other = json.loads(json.dumps(fp))
    other["config"]["hidden_size"] = 128
    with pytest.raises(PackError, match="hidden_size=64 but this base has hidden_size=128"):
        check_base(fp, other)
    other = json.loads(json.dumps(fp))
    del other["tensors"]["model.norm.weight"]
    with pytest.raises(PackError, match="'model.norm.weight' but this base does not"):
        check_base(fp, other)


def test_streaming_writer_checks_each_tensor_against_the_header(tmp_path):
    specs = {"a": (torch.float32, (2, 3)), "b": (torch.uint8, (5,))}
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(5, dtype=torch.uint8)}
    write_safetensors(tmp_path / "ok.safetensors", specs, tensors.__getitem__, {"k": "v"})
    back = load_file(str(tmp_path / "ok.safetensors"))
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    with pytest.raises(CheckpointError, match="came out as"):
        write_safetensors(tmp_path / "bad.safetensors", specs, lambda n: torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]
