"""PEFT interop against real `peft`: import then merge ≈ merge_and_unload; export loads in peft."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from skillpacks.checkpoint import open_checkpoint
from skillpacks.cli import main as cli_main
from skillpacks.format import PackError, read_pack, verify_pack
from skillpacks.merge import merge_pack
from skillpacks.peft_io import export_peft, import_peft, lora_svd
from tests.skillpacks.test_format import make_test_pack

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 380, 11, 64]])
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def make_lora(base_dir, out_dir, r=4, alpha=8, rslora=False, seed=0, targets=TARGETS, **extra):
    """A real peft LoRA on the base, with random non-zero B so the adapter does something."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("shape,r", [((48, 64), 4), ((176, 64), 8), ((64, 176), 3)])
def test_lora_svd_is_exact_and_orthonormal(shape, r):
    g = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
    u, s, vh = lora_svd(a, b, 2.5)
    dense = 2.5 * b.double() @ a.double()
    torch.testing.assert_close((u * s) @ vh, dense, atol=1e-10, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:r], atol=1e-9, rtol=1e-9)


def test_lora_svd_drops_dead_ranks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    b[:, 2:] = 0  # two ranks contribute nothing
    u, s, vh = lora_svd(a, b, 1.0)
    assert s.numel() == 2
    torch.testing.assert_close((u * s) @ vh, b.double() @ a.double(), atol=1e-10, rtol=0)
    assert lora_svd(a, torch.zeros(16, 4), 1.0)[1].numel() == 0


def test_import_then_merge_matches_peft_merge_and_unload(tiny_pair, tmp_path):
    check_import_then_merge(tiny_pair, tmp_path, TARGETS, rslora=tiny_pair.arch == "qwen2")


def check_import_then_merge(tiny_pair, tmp_path, targets, rslora=False):
    """Import a real peft LoRA on `targets`, merge the pack: each module's delta and the logits equal
    peft's merge_and_unload within the 8-bit codes' error."""
    adapter = tmp_path / "adapter"
    peft_model = make_lora(tiny_pair.base, adapter, rslora=rslora, targets=targets)
    pack = tmp_path / "lora.skillpack"
    manifest = import_peft(adapter, tiny_pair.base, pack, bits=8, group_size=32)
    assert manifest["name"] == "lora" and verify_pack(pack)
    assert len(manifest["modules"]) == 2 * len(targets)
    assert all(m["layout"]["rank"] == 4 and m["stats"]["rel_error"] < 0.02 for m in manifest["modules"])
    merged = merge_pack(pack, tiny_pair.base, tmp_path / "merged")
    want = peft_model.merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base = open_checkpoint(tiny_pair.base)
    want_sd = want.state_dict()
    for m in manifest["modules"]:
        true_delta = want_sd[m["name"]].detach().double() - base.get(m["name"]).double()
        got_delta = ours.get_parameter(m["name"]).detach().double() - base.get(m["name"]).double()
        assert true_delta.norm() > 0
        # 8-bit codes: a percent-level relative error per module, and the manifest says so honestly
        rel = float((got_delta - true_delta).norm() / true_delta.norm())
        assert rel < 0.02, m["name"]
        assert rel == pytest.approx(m["stats"]["rel_error"], rel=1e-3, abs=1e-6)
    want_logits, base_logits = logits(want), logits(AutoModelForCausalLM.from_pretrained(tiny_pair.base))
    shift = (want_logits - base_logits).abs().max()
    assert shift > 1e-2
    assert (logits(ours) - want_logits).abs().max() < 0.05 * shift


def test_import_tiers_trade_bytes_for_error(tiny_pairs, tmp_path):
    pair = tiny_pairs["mistral"]
    make_lora(pair.base, tmp_path / "adapter", r=8)
    m8 = import_peft(tmp_path / "adapter", pair.base, tmp_path / "a.skillpack", bits=8, group_size=32)
    m84 = import_peft(tmp_path / "adapter", pair.base, tmp_path / "b.skillpack", bits=[8, 4], group_size=32)
    assert m84["total_bytes"] < m8["total_bytes"]
    err = lambda m: max(x["stats"]["rel_error"] for x in m["modules"])  # noqa: E731
    assert err(m8) < err(m84) < 0.2
    assert all(x["layout"]["tiers"] == [{"rank": 4, "bits": 8, "group_size": 32}, {"rank": 4, "bits": 4, "group_size": 32}]
               for x in m84["modules"])


def test_export_loads_in_peft_and_equals_the_lowrank_part(tiny_pair, tmp_path):
    check_export_loads_in_peft(tiny_pair, tmp_path)


def check_export_loads_in_peft(tiny_pair, tmp_path):
    """Export a pack with low-rank linears and embedding: peft loads the adapter into the base and
    its logits equal the base plus the pack's low-rank linear deltas, added densely by hand."""
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(tiny_pair, pack_path, rank=lambda n: 6 if ".self_attn." in n else 3, vocab="lowrank")
    pack = read_pack(pack_path)
    report = export_peft(pack_path, tmp_path / "adapter")
    # low-rank linears are exported; a low-rank embedding/lm_head delta is not (see export_peft)
    lowrank = [r.name for r in pack.records if r.method == "lowrank" and r.kind not in ("embedding", "lm_head")]
    assert any(r.method == "lowrank" and r.kind == "embedding" for r in pack.records)
    assert report["r"] == 6 and sorted(report["exported"]) == sorted(lowrank)
    assert {m["name"] for m in report["not_exported"]} == {r.name for r in pack.records if r.name not in lowrank}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6
    # the oracle: the base with only the pack's low-rank deltas added densely, by hand
    oracle = AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32)
    with torch.no_grad():
        for name in lowrank:
            p = oracle.get_parameter(name)
            p += pack.deltas[name].dense(torch.float32)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32),
                                       tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(oracle), atol=1e-4, rtol=1e-4)
    # every loaded LoRA module carries the pack's factors (peft did not fall back to its init)
    sd = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    mlp = next(k for k in sorted(sd) if ".mlp." in k and k.endswith(".lora_B.weight"))
    assert torch.equal(sd[mlp][:, 3:], torch.zeros_like(sd[mlp][:, 3:]))  # rank 3 zero-padded to 6
    assert len(sd) == 2 * len(lowrank)


def test_export_then_import_round_trips(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama"]
    pack_path = tmp_path / "p.skillpack"
    make_test_pack(pair, pack_path, rank=4, tier_bits=(8,))
    export_peft(pack_path, tmp_path / "adapter")
    import_peft(tmp_path / "adapter", pair.base, tmp_path / "back.skillpack", bits=8, group_size=32)
    first, back = read_pack(pack_path), read_pack(tmp_path / "back.skillpack")
    for name, d in back.deltas.items():
        want = first.deltas[name].dense(torch.float64)
        assert (d.dense(torch.float64) - want).norm() / want.norm() < 0.02, name


def _edit_config(adapter, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_import_refuses_what_a_pack_cannot_hold(tiny_pairs, tmp_path):
    pair = tiny_pairs["qwen2"]
    adapter = tmp_path / "adapter"
    make_lora(pair.base, adapter)
    out = tmp_path / "x.skillpack"
    cases = [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "bias='all'"),
        (dict(use_dora=True), "use_dora=True"),
        (dict(alpha_pattern={"q_proj": 3}), "alpha_pattern"),
        (dict(peft_type="IA3"), "only LORA"),
    ]
    original = (adapter / "adapter_config.json").read_text()
    for change, match in cases:
        _edit_config(adapter, **change)
        with pytest.raises(PackError, match=match):
            import_peft(adapter, pair.base, out)
        (adapter / "adapter_config.json").write_text(original)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for edit, match in [
        (lambda w: w.update({q_a: w[q_a][:, :32].clone()}), r"lora_A \[4, 32\].*\[64, 64\]"),
        (lambda w: w.update({q_a.replace("layers.0", "layers.9"): w[q_a].clone(),
                             q_a.replace("layers.0", "layers.9").replace("lora_A", "lora_B"): w[q_a].T.contiguous()}),
         "'model.layers.9.self_attn.q_proj' has no weight"),
        (lambda w: w.pop(q_a), "has only \\['lora_B'\\]"),
    ]:
        changed = dict(weights)
        edit(changed)
        save_file(changed, str(adapter / "adapter_model.safetensors"))
        with pytest.raises(PackError, match=match):
            import_peft(adapter, pair.base, out)
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 384)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(PackError, match="not a LoRA A/B weight"):
        import_peft(adapter, pair.base, out)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(PackError, match="pickle and is never loaded"):
        import_peft(adapter, pair.base, out)
    assert not out.exists()


def test_cli_import_and_export(tiny_pairs, tmp_path, capsys):
    pair = tiny_pairs["llama_untied"]
    make_lora(pair.base, tmp_path / "adapter")
    pack = tmp_path / "cli.skillpack"
    assert cli_main(["import-peft", str(tmp_path / "adapter"), "--base", str(pair.base), "--out", str(pack),
                     "--bits", "8,4", "--group-size", "32"]) == 0
    assert "pack 'cli'" in capsys.readouterr().out
    assert cli_main(["export-peft", str(pack), "--out", str(tmp_path / "again")]) == 0
    assert "r=4" in capsys.readouterr().out
    assert cli_main(["import-peft", str(tmp_path / "adapter"), "--base", str(pair.base), "--out", str(pack),
                     "--bits", "3"]) == 1
    assert "bits=3 is not supported" in capsys.readouterr().err
