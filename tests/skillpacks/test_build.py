"""`build_pack` end to end on the tiny pairs: sizes counted honestly, recorded errors true, bad pairs refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from skillpacks.build import BuildError, build_pack
from skillpacks.cli import main as cli_main
from skillpacks.compress import lowrank_bytes
from skillpacks.format import read_pack
from skillpacks.module_kinds import module_kind


def _true_deltas(pair):
    """tuned − base straight from the safetensors files (the oracle), changed tensors only."""
    base, tuned = load_file(pair.base / "model.safetensors"), load_file(pair.tuned / "model.safetensors")
    return {n: tuned[n].double() - base[n].double() for n in base if torch.any(tuned[n] != base[n])}


def _check_recorded_errors(pack, deltas):
    for record in pack.records:
        d = deltas[record.name]
        approx = pack.deltas[record.name].dense(torch.float64)
        rel = float((d - approx).norm() / d.norm())
        assert record.stats["rel_error"] == pytest.approx(rel, rel=1e-4, abs=1e-7), record.name


def _copy_pair(pair, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(pair.tuned, tuned)
    return tuned


def test_default_budget_build_fits_one_sixteenth_of_the_fp16_delta(tiny_pair, tmp_path):
    out, report = tmp_path / "skill.skillpack", tmp_path / "report.json"
    manifest = build_pack(tiny_pair.base, tiny_pair.tuned, out, report=report, progress=False)
    deltas = _true_deltas(tiny_pair)
    fp16_bytes = sum(d.numel() * 2 for d in deltas.values())
    file_bytes = out.stat().st_size  # the whole file: length prefix, header, manifest, payload
    assert file_bytes <= fp16_bytes / 16
    pack = read_pack(out)
    assert pack.manifest["payload_sha256"] == manifest["payload_sha256"]
    _check_recorded_errors(pack, deltas)
    # norms and biases are always stored, exactly, whatever the budget
    records = {r.name: r for r in pack.records}
    kept_exactly = [n for n in deltas if module_kind(n) in ("norm", "bias")]
    assert kept_exactly and all(records[n].method == "exact" for n in kept_exactly)
    assert all(torch.equal(pack.deltas[n].delta, deltas[n].float()) for n in kept_exactly)
    for record in pack.records:
        assert record.stats["bytes"] == pack.deltas[record.name].nbytes
    summary = json.loads(report.read_text())
    assert summary["file_bytes"] == file_bytes and summary["fp16_delta_bytes"] == fp16_bytes
    assert summary["compression_ratio"] == pytest.approx(fp16_bytes / file_bytes)
    assert summary["payload_bytes"] == sum(r.stats["bytes"] for r in pack.records)
    assert summary["modules_changed"] == len(deltas)
    err = sum(float((deltas[n] - pack.deltas[n].dense(torch.float64)).square().sum()) if n in pack.deltas
              else float(d.square().sum()) for n, d in deltas.items())
    total = sum(float(d.square().sum()) for d in deltas.values())
    assert summary["total_rel_error"] == pytest.approx((err / total) ** 0.5, rel=1e-4)


def test_larger_budget_stores_more_and_errs_less(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama_untied"]
    errors = []
    for budget in (0.0625, 0.25):
        report = tmp_path / f"r{budget}.json"
        build_pack(pair.base, pair.tuned, tmp_path / f"p{budget}.skillpack", budget=budget, report=report,
                   progress=False)
        summary = json.loads(report.read_text())
        assert summary["size_fraction"] <= budget
        errors.append(summary["total_rel_error"])
    assert errors[1] < errors[0]


def test_graftllm_preset_stores_every_changed_module_by_kind(tiny_pair, tmp_path):
    out = tmp_path / "preset.skillpack"
    build_pack(tiny_pair.base, tiny_pair.tuned, out, preset="graftllm", progress=False)
    pack = read_pack(out)
    deltas = _true_deltas(tiny_pair)
    assert {r.name for r in pack.records} == set(deltas)
    _check_recorded_errors(pack, deltas)
    want_method = {"embedding": "sparse", "lm_head": "sparse", "attention": "lowrank", "mlp": "lowrank",
                   "norm": "exact", "bias": "exact"}
    for r in pack.records:
        assert r.method == want_method[r.kind], r.name
        if r.method == "lowrank":
            out_f, in_f = r.shape
            tiers = [(t["bits"], t["rank"]) for t in r.stats["tiers"]]
            assert lowrank_bytes(in_f, out_f, tiers, r.stats["group_size"]) <= out_f * in_f * 2
            assert r.stats["tiers"][0]["bits"] == 8
        if r.kind == "mlp":
            assert r.stats["energy_kept"] >= 0.9
        if r.method == "sparse":
            assert r.stats["kept_fraction"] == pytest.approx(0.1, abs=1 / (384 * 64))
        if r.method == "exact":
            assert r.stats["rel_error"] == 0.0
    kinds = {r.kind for r in pack.records}
    if tiny_pair.arch == "llama":  # tied: the embedding delta serves the head, stored once
        assert "lm_head" not in kinds
        emb = next(r for r in pack.records if r.kind == "embedding")
        assert emb.stats["tied_lm_head"] is True
    else:
        assert "lm_head" in kinds
    assert ("bias" in kinds) == (tiny_pair.arch == "qwen2")


def test_unchanged_tensors_are_skipped(tiny_pairs, tmp_path):
    pair = tiny_pairs["mistral"]
    tuned = _copy_pair(pair, tmp_path)
    base_t, tuned_t = load_file(pair.base / "model.safetensors"), load_file(tuned / "model.safetensors")
    same = "model.layers.1.mlp.up_proj.weight"
    tuned_t[same] = base_t[same].clone()
    save_file(tuned_t, tuned / "model.safetensors", metadata={"format": "pt"})
    report = tmp_path / "r.json"
    manifest = build_pack(pair.base, tuned, tmp_path / "p.skillpack", preset="graftllm", report=report,
                          progress=False)
    assert same not in {m["name"] for m in manifest["modules"]}
    assert json.loads(report.read_text())["modules_changed"] == len(base_t) - 1


def test_mismatched_shape_is_refused_with_a_clear_error(tiny_pairs, tmp_path):
    pair = tiny_pairs["qwen2"]
    tuned = _copy_pair(pair, tmp_path)
    tensors = load_file(tuned / "model.safetensors")
    bad = "model.layers.0.self_attn.k_proj.weight"
    tensors[bad] = torch.zeros(48, 64)
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[48, 64\] in the "
                                         r"tuned checkpoint but \[32, 64\] in the base"):
        build_pack(pair.base, tuned, tmp_path / "x.skillpack", progress=False)
    assert not (tmp_path / "x.skillpack").exists()


def test_missing_tensor_and_identical_checkpoints_are_refused(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama_untied"]
    tuned = _copy_pair(pair, tmp_path)
    tensors = load_file(tuned / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match="lacks tensor 'model.norm.weight'"):
        build_pack(pair.base, tuned, tmp_path / "x.skillpack", progress=False)
    with pytest.raises(BuildError, match="no tensor changed"):
        build_pack(pair.base, pair.base, tmp_path / "x.skillpack", progress=False)
    with pytest.raises(BuildError, match="budget=2.0"):
        build_pack(pair.base, pair.tuned, tmp_path / "x.skillpack", budget=2.0, progress=False)
    with pytest.raises(BuildError, match="preset 'lora'"):
        build_pack(pair.base, pair.tuned, tmp_path / "x.skillpack", preset="lora", progress=False)


def test_calibrated_build_records_output_error(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama"]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"{a} plus {b} is {a + b}."}) for a in range(8) for b in range(4)))
    out = tmp_path / "cal.skillpack"
    manifest = build_pack(pair.base, pair.tuned, out, budget=0.25, calib=calib, progress=False)
    assert manifest["build"]["calibrated"] is True
    pack = read_pack(out)
    # every linear is calibrated; the embedding (rows looked up by token id) is not
    linears = [r for r in pack.records if r.method == "lowrank" and r.kind != "embedding"]
    assert linears and all(0.0 <= r.stats["calib_rel_error"] < 1.0 for r in linears)
    assert all("calib_rel_error" not in r.stats for r in pack.records if r.kind == "embedding")
    _check_recorded_errors(pack, _true_deltas(pair))


def test_cli_build_writes_pack_and_report(tiny_pairs, tmp_path, capsys):
    pair = tiny_pairs["mistral"]
    out, report = tmp_path / "cli.skillpack", tmp_path / "cli.json"
    rc = cli_main(["build", "--base", str(pair.base), "--tuned", str(pair.tuned), "--out", str(out),
                   "--name", "arith", "--description", "adds numbers", "--budget", "1/8",  # as graft and eval take it
                   "--report", str(report), "--quiet"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    pack = read_pack(out)
    assert pack.name == "arith" and pack.manifest["description"] == "adds numbers"
    assert json.loads(report.read_text())["size_fraction"] <= 0.125
    rc = cli_main(["build", "--base", str(pair.base), "--tuned", str(tiny_pairs["llama"].tuned),
                   "--out", str(tmp_path / "bad.skillpack"), "--quiet"])
    assert rc == 2 and "lm_head.weight" in capsys.readouterr().err
