"""Merged checkpoints equal base + delta, tensor by tensor and in transformers' own forward."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from skillpacks.checkpoint import open_checkpoint
from skillpacks.cli import main as cli_main
from skillpacks.format import PackError, read_pack
from skillpacks.merge import merge_pack
from tests.skillpacks.test_format import make_test_pack

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 380, 11, 64]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def test_merge_equals_base_plus_delta(tiny_pair, tmp_path):
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(tiny_pair, pack_path)
    out = merge_pack(pack_path, tiny_pair.base, tmp_path / "merged")
    pack, base = read_pack(pack_path), open_checkpoint(tiny_pair.base)
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base.names())
    for name in base.names():
        want = base.get(name).double()
        if name in pack.deltas:
            want = want + pack.deltas[name].dense(torch.float64)
        assert merged[name].dtype == base.dtype(name)
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=0, msg=name)
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_pair.base / "config.json").read_text())


def test_merged_model_matches_hand_patched_forward(tiny_pair, tmp_path):
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(tiny_pair, pack_path)
    merged_model = AutoModelForCausalLM.from_pretrained(merge_pack(pack_path, tiny_pair.base, tmp_path / "m"),
                                                        dtype=torch.float32)
    # oracle: the base model with every pack delta added to its parameters by hand
    oracle = AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32)
    base_logits = logits(oracle)
    with torch.no_grad():
        for name, delta in read_pack(pack_path).deltas.items():
            p = oracle.get_parameter(name)
            p += delta.dense(torch.float32).view(p.shape)
    torch.testing.assert_close(logits(merged_model), logits(oracle), atol=1e-4, rtol=1e-4)
    assert (logits(merged_model) - base_logits).abs().max() > 1e-3  # the pack really changed something
    tied = tiny_pair.arch == "llama"
    assert merged_model.config.tie_word_embeddings is tied
    assert (merged_model.lm_head.weight.data_ptr() == merged_model.model.embed_tokens.weight.data_ptr()) is tied


def test_tied_base_gets_the_embedding_delta_once(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama"]
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(pair, pack_path)
    out = merge_pack(pack_path, pair.base, tmp_path / "m")
    merged = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in merged
    emb = "model.embed_tokens.weight"
    want = open_checkpoint(pair.base).get(emb) + read_pack(pack_path).deltas[emb].dense()
    torch.testing.assert_close(merged[emb], want, atol=1e-6, rtol=0)


def test_dtype_and_sharding(tiny_pairs, tmp_path):
    pair = tiny_pairs["qwen2"]
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(pair, pack_path)
    single = merge_pack(pack_path, pair.base, tmp_path / "single", dtype="bfloat16")
    sharded = merge_pack(pack_path, pair.base, tmp_path / "sharded", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((single / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = open_checkpoint(single), open_checkpoint(sharded)
    assert a.names() == b.names()
    for name in a.names():
        assert a.dtype(name) == torch.bfloat16
        assert torch.equal(a.get(name), b.get(name)), name
    m_single = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    m_sharded = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    assert torch.equal(logits(m_single), logits(m_sharded))


def test_merge_refuses_bad_inputs_and_leaves_nothing(tiny_pairs, tmp_path):
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(tiny_pairs["llama_untied"], pack_path)
    with pytest.raises(PackError, match="MistralForCausalLM"):
        merge_pack(pack_path, tiny_pairs["mistral"].base, tmp_path / "out")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        merge_pack(pack_path, tiny_pairs["llama_untied"].base, tmp_path / "out", dtype="int8")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_pack(pack_path, tiny_pairs["llama_untied"].base, busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "p.skillpack"]


def test_cli_merge(tiny_pairs, tmp_path, capsys):
    pair = tiny_pairs["mistral"]
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(pair, pack_path)
    assert cli_main(["merge", str(pack_path), "--base", str(pair.base), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert cli_main(["merge", str(pack_path), "--base", str(tiny_pairs["qwen2"].base),
                     "--out", str(tmp_path / "n")]) == 1
    assert "error: the pack was built for architecture" in capsys.readouterr().err
