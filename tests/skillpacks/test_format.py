"""Pack write/read round trips on real deltas of the tiny pairs, and the manifest schema.

`make_test_pack` is the small stand-in builder the other format/merge/PEFT tests share:
truncated SVD + `quantize_groupwise` for 2-D linears, top-magnitude entries for the
embedding / head, exact deltas for norms and biases.
"""
import json
import math

import pytest
import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_kernels.quant import quantize_groupwise
from skillpacks.checkpoint import open_checkpoint, read_header
from skillpacks.deltas import ExactDelta, ModuleRecord, SparseDelta
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import (
    FORMAT_VERSION, PackError, read_manifest, read_pack, validate_pack_name, verify_pack, write_pack,
)


def module_kind(name: str, shape: tuple) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if len(shape) == 1:
        return "bias" if name.endswith(".bias") else "norm"
    return "attention" if ".self_attn." in name else "mlp"


def lowrank_delta(delta: torch.Tensor, rank: int, tier_bits=(8, 4), group_size=32) -> LowRankDelta:
    """Truncated SVD of a dense delta, split into two tiers of quantized factors."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    u, s, vh = u[:, :rank].float(), s[:rank].float(), vh[:rank].float()
    cut = [0, (rank + 1) // 2, rank] if len(tier_bits) == 2 else [0, rank]
    a_tiers, bt_tiers = [], []
    for k, bits in enumerate(tier_bits[: len(cut) - 1]):
        a_tiers.append(quantize_groupwise(vh[cut[k]: cut[k + 1]], bits, group_size))
        bt_tiers.append(quantize_groupwise(u[:, cut[k]: cut[k + 1]].T, bits, group_size))
    return LowRankDelta(a_tiers, bt_tiers, s, delta.shape[1], delta.shape[0])


def sparse_delta(delta: torch.Tensor, keep: float = 0.1) -> SparseDelta:
    flat = delta.flatten()
    k = max(1, int(flat.numel() * keep))
    idx = flat.abs().topk(k).indices.sort().values
    return SparseDelta(idx.to(torch.int32), flat[idx].to(torch.float16), tuple(delta.shape))


def make_test_pack(pair, out, name="skill", rank=8, tier_bits=(8, 4), vocab="sparse"):
    """Build a pack from the real delta of a tiny (base, tuned) pair; returns (manifest, deltas).
    `rank` is one rank for every linear, or a function of the tensor name; `vocab` is how the
    embedding/lm_head deltas are stored (sparse, or lowrank at rank 4)."""
    base, tuned = open_checkpoint(pair.base), open_checkpoint(pair.tuned)
    deltas, records = {}, []
    for tname in base.names():
        delta = tuned.get(tname).float() - base.get(tname).float()
        kind = module_kind(tname, tuple(delta.shape))
        if kind in ("embedding", "lm_head") and vocab == "sparse":
            d, method = sparse_delta(delta), "sparse"
        elif kind in ("embedding", "lm_head"):
            d, method = lowrank_delta(delta, 4, tier_bits), "lowrank"
        elif delta.dim() == 2:
            r = rank(tname) if callable(rank) else rank
            d, method = lowrank_delta(delta, r, tier_bits), "lowrank"
        else:
            d, method = ExactDelta(delta), "exact"
        deltas[tname] = d
        records.append(ModuleRecord(tname, kind, method, list(delta.shape), {"note": "test"}))
    manifest = write_pack(out, name, "a test pack", base_fingerprint(base), deltas, records, {"tool": "tests"})
    return manifest, deltas


def test_round_trip_is_exact(tiny_pair, tmp_path):
    path = tmp_path / "x.skillpack"
    manifest, deltas = make_test_pack(tiny_pair, path)
    pack = read_pack(path)
    assert pack.manifest == json.loads(json.dumps(manifest))
    assert set(pack.deltas) == set(deltas)
    for tname, want in deltas.items():
        got = pack.deltas[tname]
        assert type(got) is type(want)
        assert torch.equal(got.dense(torch.float64), want.dense(torch.float64)), tname
    assert [r.name for r in pack.records] == list(deltas)
    assert read_manifest(path) == pack.manifest


@pytest.mark.parametrize("vocab", ["sparse", "lowrank"])
def test_an_unchanged_file_is_parsed_to_the_same_pack_as_a_checked_read(tiny_pair, tmp_path, vocab):
    path = tmp_path / "x.skillpack"
    make_test_pack(tiny_pair, path, vocab=vocab)
    checked, parsed = read_pack(path), read_pack(path, unchanged=True)
    assert parsed.manifest == checked.manifest and parsed.records == checked.records
    assert set(parsed.deltas) == set(checked.deltas)
    for tname, want in checked.deltas.items():
        got = parsed.deltas[tname]
        assert type(got) is type(want)
        mine, theirs = vars(got), vars(want)
        assert mine.keys() == theirs.keys()
        for field, value in theirs.items():  # every stored tensor bit for bit, every other field equal
            if isinstance(value, list):
                for a, b in zip(mine[field], value):
                    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(
                        (a.codes, a.scales, a.zeros), (b.codes, b.scales, b.zeros))), (tname, field)
                    assert (a.bits, a.group_size, a.cols) == (b.bits, b.group_size, b.cols)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine[field], value) and mine[field].dtype == value.dtype, (tname, field)
            else:
                assert mine[field] == value, (tname, field)


def test_manifest_sizes_are_counted_honestly(tiny_pair, tmp_path):
    path = tmp_path / "x.skillpack"
    manifest, deltas = make_test_pack(tiny_pair, path)
    header = read_header(path)
    stored = sum(t.end - t.begin for t in header.tensors.values())
    assert manifest["total_bytes"] == stored == sum(d.nbytes for d in deltas.values())
    assert manifest["fp16_delta_bytes"] == sum(2 * math.prod(m["shape"]) for m in manifest["modules"])
    assert manifest["compression_ratio"] == pytest.approx(manifest["fp16_delta_bytes"] / stored, rel=1e-3)
    assert manifest["format_version"] == FORMAT_VERSION
    # the file is exactly length prefix + header + payload, with no slack
    assert path.stat().st_size == header.data_start + stored


def test_file_is_readable_by_safetensors_itself(tiny_pairs, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "x.skillpack"
    make_test_pack(tiny_pairs["qwen2"], path)
    header = read_header(path)
    loaded = load_file(str(path))
    assert set(loaded) == set(header.tensors)
    lowrank = read_pack(path).deltas["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight:A.0.codes"], lowrank.a_tiers[0].codes)


def test_lowrank_round_trip_approximates_the_true_delta(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama_untied"]
    base, tuned = open_checkpoint(pair.base), open_checkpoint(pair.tuned)
    name = "model.layers.1.mlp.down_proj.weight"
    true = tuned.get(name).double() - base.get(name).double()
    path = tmp_path / "x.skillpack"
    make_test_pack(pair, path, rank=64, tier_bits=(8,))
    got = read_pack(path).deltas[name].dense(torch.float64)
    assert (got - true).norm() / true.norm() < 0.05


@pytest.mark.parametrize("name", ["a", "skill-1.v2_x", "A" * 64])
def test_valid_pack_names(name):
    assert validate_pack_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "a b", "A" * 65, "ü", "../x", None])
def test_invalid_pack_names_are_refused_with_the_name(name):
    with pytest.raises(PackError, match="pack name"):
        validate_pack_name(name)


def test_write_refuses_records_that_disagree_with_deltas(tiny_pairs, tmp_path):
    pair = tiny_pairs["llama"]
    base = open_checkpoint(pair.base)
    fp = base_fingerprint(base)
    name = "model.norm.weight"
    d = {name: ExactDelta(torch.zeros(64))}
    with pytest.raises(PackError, match="recorded as 'lowrank'"):
        write_pack(tmp_path / "a.skillpack", "a", "", fp, d, [ModuleRecord(name, "norm", "lowrank", [64])], {})
    with pytest.raises(PackError, match=r"shape \[32\]"):
        write_pack(tmp_path / "a.skillpack", "a", "", fp, d, [ModuleRecord(name, "norm", "exact", [32])], {})
    with pytest.raises(PackError, match="one record per delta"):
        write_pack(tmp_path / "a.skillpack", "a", "", fp, d, [], {})
    with pytest.raises(PackError, match="not a tensor of the base"):
        write_pack(tmp_path / "a.skillpack", "a", "", fp, {"nope.weight": ExactDelta(torch.zeros(3))},
                   [ModuleRecord("nope.weight", "norm", "exact", [3])], {})
    with pytest.raises(PackError, match="strict JSON"):
        write_pack(tmp_path / "a.skillpack", "a", "", fp, d,
                   [ModuleRecord(name, "norm", "exact", [64], {"rel_error": float("nan")})], {})
    assert not list(tmp_path.iterdir())  # nothing, not even a temp file, is left behind


def test_verify_returns_manifest_and_checks_base(tiny_pairs, tmp_path):
    pair = tiny_pairs["mistral"]
    path = tmp_path / "x.skillpack"
    manifest, _ = make_test_pack(pair, path)
    fp = base_fingerprint(open_checkpoint(pair.base))
    assert verify_pack(path, fp)["payload_sha256"] == manifest["payload_sha256"]
