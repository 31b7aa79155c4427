"""Per-module compression: kinds, sparse pruning, low-rank tiers, sizes and recorded errors."""
import math

import pytest
import torch
from safetensors.torch import load_file

from skillpack_kernels.quant import QuantTensor, dequantize_groupwise, padded_cols, quantize_groupwise
from skillpacks.compress import (
    CLIP_GRID, DEFAULT_TIERS, Recipe, cap_rank_to_dense, choose_group_size, compress_with_recipe, delta_svd, energy_rank,
    exact_delta, exact_stats, fitted_rank, keep_count, lowrank_bytes, lowrank_delta, lowrank_stats, rank_bytes,
    quantize_clipped, sparse_delta, sparse_stats, split_tiers,
)
from skillpacks.format import delta_tensors
from skillpacks.module_kinds import module_kind, storage_method


def _stored_bytes(name, delta_obj):
    return sum(t.numel() * t.element_size() for t in delta_tensors(name, delta_obj).values())


def _low_rank(out_f, in_f, rank, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)) * scale


@pytest.mark.parametrize("name,kind", [
    ("model.embed_tokens.weight", "embedding"),
    ("lm_head.weight", "lm_head"),
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.11.self_attn.o_proj.weight", "attention"),
    ("model.layers.3.mlp.down_proj.weight", "mlp"),
    ("model.layers.3.mlp.gate_proj.weight", "mlp"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.7.post_attention_layernorm.weight", "norm"),
    ("model.norm.weight", "norm"),
    ("model.layers.0.self_attn.k_proj.bias", "bias"),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", "other"),
])
def test_module_kind_by_name(name, kind):
    assert module_kind(name) == kind


def test_every_tiny_tensor_gets_a_known_kind(tiny_pair):
    names = load_file(tiny_pair.base / "model.safetensors").keys()
    kinds = {n: module_kind(n) for n in names}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    assert sum(k == "attention" for k in kinds.values()) == 8  # 2 layers x q/k/v/o
    assert sum(k == "mlp" for k in kinds.values()) == 6
    assert sum(k == "bias" for k in kinds.values()) == (6 if tiny_pair.arch == "qwen2" else 0)


def test_storage_method_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'conv'"):
        storage_method("conv", (3, 3))
    assert storage_method("mlp", (4,)) == "exact"  # a 1-D tensor cannot be factored


@pytest.mark.parametrize("shape", [(176, 64), (64, 176), (37, 91)])
def test_exactly_low_rank_delta_reconstructs_at_8_bits(shape):
    delta = _low_rank(*shape, rank=6)
    u, s, vh = delta_svd(delta)
    gs = choose_group_size(shape[1], shape[0])
    ld = lowrank_delta(u, s, vh, [(8, 6)], gs)
    rel = float((ld.dense(torch.float64) - delta.double()).norm() / delta.double().norm())
    assert rel <= 1e-2


def test_lowrank_stats_match_an_independent_recomputation():
    delta = _low_rank(176, 64, rank=20, seed=1) + 1e-3 * torch.randn(176, 64, generator=torch.Generator().manual_seed(2))
    u, s, vh = delta_svd(delta)
    tiers = split_tiers(12, DEFAULT_TIERS)
    gs = choose_group_size(64, 176)
    ld = lowrank_delta(u, s, vh, tiers, gs)
    stats = lowrank_stats(delta, s, ld, gs)
    # oracle: dequantize every tier by hand and rebuild B diag(s) A in float64
    a = torch.cat([dequantize_groupwise(t, torch.float64) for t in ld.a_tiers])
    bt = torch.cat([dequantize_groupwise(t, torch.float64) for t in ld.bt_tiers])
    approx = bt.T @ torch.diag(ld.s.double()) @ a
    want = float((delta.double() - approx).norm() / delta.double().norm())
    assert stats["rel_error"] == pytest.approx(want, rel=1e-5)
    sv = torch.linalg.svdvals(delta.double())
    assert stats["energy_kept"] == pytest.approx(float((sv[:12] ** 2).sum() / (sv ** 2).sum()), rel=1e-9)
    assert stats["tiers"] == [{"bits": b, "rank": r} for b, r in tiers]
    assert stats["bytes"] == _stored_bytes("m", ld) == lowrank_bytes(64, 176, tiers, gs)


def test_sparse_delta_keeps_the_largest_magnitudes():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(40, 24, generator=g)
    sd = sparse_delta(delta, 50)
    flat = delta.reshape(-1).tolist()
    want = sorted(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:50])
    assert sd.indices.dtype == torch.int32 and sd.values.dtype == torch.float16
    assert sd.indices.tolist() == want
    assert torch.equal(sd.values, delta.reshape(-1)[want].half())
    stats = sparse_stats(delta, sd)
    residual = delta.double().clone().reshape(-1)
    residual[want] = delta.reshape(-1)[want].double() - sd.values.double()
    assert stats["rel_error"] == pytest.approx(float(residual.norm() / delta.double().norm()), rel=1e-9)
    assert stats["kept_fraction"] == 50 / delta.numel()
    assert stats["bytes"] == _stored_bytes("m", sd) == 50 * 6


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows,cols,group_size", [(5, 64, 32), (3, 50, 16), (4, 200, 128)])
def test_clipped_quantization_takes_the_best_range_of_each_group(bits, rows, cols, group_size):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(bits + cols))
    w[0, 3] = 6.0  # an outlier, so clipping matters
    qt = quantize_clipped(w, bits, group_size)
    qt.validate()
    got = dequantize_groupwise(qt).double()
    plain = dequantize_groupwise(quantize_groupwise(w, bits, group_size)).double()
    pc = padded_cols(cols, group_size)
    got_padded = dequantize_groupwise(QuantTensor(qt.codes, qt.scales, qt.zeros, bits, group_size, pc)).double()
    # oracle: each group on its own, every shrink of its range, rounded the obvious way
    padded = torch.cat([w, w[:, -1:].expand(rows, pc - cols)], dim=1).double()
    maxq = (1 << bits) - 1
    for r in range(rows):
        for start in range(0, pc, group_size):
            x = padded[r, start:start + group_size]
            errors = []
            for shrink in CLIP_GRID:
                scale = torch.tensor(float((x.max() - x.min()) * shrink) / maxq).half().double()
                zero = torch.tensor(float(x.min() * shrink)).half().double()
                q = torch.round((x - zero) / scale).clamp(0, maxq) if scale > 0 else torch.zeros_like(x)
                errors.append(float((q * scale + zero - x).square().sum()))
            got_err = float((got_padded[r, start:start + group_size] - x).square().sum())
            assert got_err == pytest.approx(min(errors), rel=1e-4, abs=1e-9)
    assert torch.equal(got, got_padded[:, :cols])
    worse = float((plain - w.double()).square().sum())
    assert float((got - w.double()).square().sum()) <= worse * (0.8 if bits == 2 else 1.0)


def test_exact_delta_is_exact():
    delta = torch.randn(64, dtype=torch.float32)
    ed = exact_delta(delta)
    stats = exact_stats(delta, ed)
    assert torch.equal(ed.delta, delta) and stats["rel_error"] == 0.0 and stats["bytes"] == 64 * 4


def test_split_tiers_are_consecutive_and_largest_first():
    for rank in (1, 2, 3, 7, 10, 50, 1000):
        tiers = split_tiers(rank, DEFAULT_TIERS)
        assert sum(r for _, r in tiers) == rank
        assert tiers[0] == (8, tiers[0][1]) and tiers[0][1] >= 1
        assert [b for b, _ in tiers] == sorted({b for b, _ in tiers}, reverse=True)
    assert split_tiers(1000, DEFAULT_TIERS) == [(8, 20), (4, 180), (2, 800)]


@pytest.mark.parametrize("out_f,in_f", [(64, 64), (32, 64), (176, 64), (1536, 576), (8, 4096)])
def test_fitted_rank_never_costs_more_than_dense_fp16(out_f, in_f):
    gs = choose_group_size(in_f, out_f)
    for fraction in (0.05, 0.25, 0.5, 1.0):
        rank = fitted_rank(out_f, in_f, fraction, DEFAULT_TIERS, gs)
        assert 1 <= rank <= max(1, round(fraction * min(out_f, in_f)))
        if rank > 1:
            assert lowrank_bytes(in_f, out_f, split_tiers(rank, DEFAULT_TIERS), gs) <= out_f * in_f * 2
        if rank < round(fraction * min(out_f, in_f)):  # lowered: one more rank would not fit
            assert lowrank_bytes(in_f, out_f, split_tiers(rank + 1, DEFAULT_TIERS), gs) > out_f * in_f * 2


def test_energy_rank_is_the_smallest_rank_reaching_the_energy():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    total = float((s ** 2).sum())
    for beta in (0.1, 0.5, 0.9, 0.99, 1.0):
        brute = next(r for r in range(1, 7) if float((s[:r] ** 2).sum()) / total >= beta - 1e-12)
        assert energy_rank(s, beta) == brute
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_group_size_choice_minimises_stored_bytes():
    for in_f, out_f in ((64, 176), (576, 1536), (576, 192), (100, 37)):
        gs = choose_group_size(in_f, out_f)
        assert rank_bytes(in_f, out_f, 4, gs) == min(rank_bytes(in_f, out_f, 4, g) for g in (16, 32, 64, 128))
        assert padded_cols(in_f, gs) - in_f < gs


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="mlp_energy=1.5"):
        Recipe(mlp_energy=1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        Recipe(tiers=((8, 0.5), (4, 0.2)))
    with pytest.raises(ValueError, match="largest first"):
        Recipe(tiers=((4, 0.5), (8, 0.5)))


def test_recipe_per_kind():
    recipe = Recipe()
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(384, 64, generator=g)
    sd, st = compress_with_recipe("embedding", emb, recipe)
    assert st["method"] == "sparse" and sd.indices.numel() == keep_count(emb.numel(), 0.1)
    mlp = _low_rank(176, 64, rank=30, seed=5) + 1e-4 * torch.randn(176, 64, generator=g)
    ld, st = compress_with_recipe("mlp", mlp, recipe)
    sv2 = torch.linalg.svdvals(mlp.double()) ** 2
    assert st["rank"] == energy_rank(sv2.sqrt(), 0.9) and st["energy_kept"] >= 0.9
    attn = torch.randn(64, 64, generator=g)
    ld, st = compress_with_recipe("attention", attn, recipe)
    assert st["rank"] == fitted_rank(64, 64, 0.25, recipe.tiers, st["group_size"]) == 16
    norm = torch.randn(64, generator=g)
    _, st = compress_with_recipe("norm", norm, recipe)
    assert st["method"] == "exact" and st["rel_error"] == 0.0
    assert math.isclose(st["delta_norm"], float(norm.double().norm()))
    assert cap_rank_to_dense(64, 64, 64, recipe.tiers, 64) <= 64
