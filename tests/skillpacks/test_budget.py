"""Budget allocation: bytes respected, tiers well formed, and less error than a uniform split."""
import pytest
import torch
from safetensors.torch import load_file

from skillpack_evals.baselines import compress_deltas
from skillpacks.budget import (
    ExactModule, HeaderCost, LowRankModule, SparseModule, allocate, budget_label, group_size_options, parse_budget,
    sparse_grid, sparse_spectrum, NOISE_WEIGHT, rank_error, uniform_plans, vector_error,
)
from skillpacks.compress import delta_svd, exact_delta, lowrank_delta, rank_bytes, sparse_delta
from skillpacks.module_kinds import ALWAYS_STORED_KINDS, module_kind, storage_method


def _deltas(pair):
    base, tuned = load_file(pair.base / "model.safetensors"), load_file(pair.tuned / "model.safetensors")
    return {n: tuned[n].float() - base[n].float() for n in sorted(base) if torch.any(tuned[n] != base[n])}


def _spectra(deltas):
    modules = []
    for name, d in deltas.items():
        kind = module_kind(name)
        method = storage_method(kind, tuple(d.shape))
        if method == "lowrank":
            sq = (torch.linalg.svdvals(d.double()) ** 2).tolist()
            modules.append(LowRankModule(name, kind, d.shape[0], d.shape[1], sq, group_size_options(d.shape[1], d.shape[0])))
        elif method == "sparse":
            counts = sparse_grid(d.numel())
            modules.append(SparseModule(name, kind, d.numel(), counts, sparse_spectrum(d, counts), float(d.double().square().sum())))
        else:
            modules.append(ExactModule(name, kind, d.numel() * 4, float(d.double().square().sum()),
                                       required=kind in ALWAYS_STORED_KINDS))
    return modules


def _compress(deltas, plans):
    """Compress by plans; return (payload bytes, measured Σ‖Δ − Δ̂‖²)."""
    total_bytes, err = 0, 0.0
    for name, d in deltas.items():
        plan = plans[name]
        if plan.method == "lowrank":
            u, s, vh = delta_svd(d)
            obj = lowrank_delta(u, s, vh, plan.tier_ranks, plan.group_size)  # as the builder: plain RTN
        elif plan.method == "sparse":
            obj = sparse_delta(d, plan.count)
        elif plan.method == "exact":
            obj = exact_delta(d)
        else:
            err += float(d.double().square().sum())
            continue
        total_bytes += obj.nbytes
        err += float((d.double() - obj.dense(torch.float64)).square().sum())
    return total_bytes, err


def test_vector_error_falls_with_bits():
    errors = [vector_error(b, 64, 576) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 1e-3


def test_sparse_spectrum_matches_sorting():
    d = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    counts = sparse_grid(d.numel())
    assert counts[0] == 1 and counts[-1] == d.numel() // 3 and counts == sorted(set(counts))
    top = sorted((d.reshape(-1).double() ** 2).tolist(), reverse=True)
    want = [sum(top[:c]) for c in counts]
    assert sparse_spectrum(d, counts) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("budget", [9_000, 20_000, 80_000])
@pytest.mark.parametrize("header", [None, HeaderCost()])
def test_allocation_respects_the_budget_and_forms_valid_tiers(tiny_pairs, budget, header):
    deltas = _deltas(tiny_pairs["qwen2"])
    plans = allocate(_spectra(deltas), budget, header=header)
    assert sum(p.est_bytes for p in plans.values()) <= budget
    for name, plan in plans.items():
        if plan.method == "lowrank":
            bits = [b for b, _ in plan.tier_ranks]
            assert bits == sorted(set(bits), reverse=True) and all(r > 0 for _, r in plan.tier_ranks)
            assert sum(r for _, r in plan.tier_ranks) <= min(deltas[name].shape)
    payload, _ = _compress(deltas, plans)
    assert payload <= budget  # the estimate of payload bytes is exact, not just a guess


@pytest.mark.parametrize("arch", ["llama_untied", "qwen2"])
@pytest.mark.parametrize("rank_fraction,bits,keep", [(0.125, 4, 0.02), (0.25, 2, 0.05), (0.25, 8, 0.01)])
def test_allocation_beats_a_uniform_split_at_equal_bytes(tiny_pairs, arch, rank_fraction, bits, keep):
    deltas = _deltas(tiny_pairs[arch])
    spectra = _spectra(deltas)
    uniform_bytes, uniform_err = _compress(deltas, uniform_plans(spectra, rank_fraction, bits, keep))
    alloc_bytes, alloc_err = _compress(deltas, allocate(spectra, uniform_bytes, noise_weight=1.0))
    assert alloc_bytes <= uniform_bytes
    assert alloc_err < uniform_err, (alloc_err, uniform_err)


def test_estimated_error_tracks_measured_error(tiny_pairs):
    deltas = _deltas(tiny_pairs["llama"])
    plans = allocate(_spectra(deltas), 40_000, noise_weight=1.0)
    _, measured = _compress(deltas, plans)
    estimated = sum(p.est_error_sq for p in plans.values())
    assert 0.7 * measured <= estimated <= 1.3 * measured


def test_allocation_rejects_negative_budget():
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        allocate([], -1)


@pytest.mark.parametrize("header", [None, HeaderCost()])
def test_norms_and_biases_are_always_stored_exactly(tiny_pairs, header):
    deltas = _deltas(tiny_pairs["qwen2"])
    spectra = _spectra(deltas)
    required = [m for m in spectra if isinstance(m, ExactModule) and m.required]
    assert {module_kind(m.name) for m in required} == {"norm", "bias"}
    need = sum(m.nbytes + (header.module(m.name, "exact") if header else 0) for m in required)
    for budget in (need, need + 2_000, 40_000):
        plans = allocate(spectra, budget, header=header)
        assert all(plans[m.name].method == "exact" for m in required)
        assert sum(p.est_bytes for p in plans.values()) <= budget
    with pytest.raises(ValueError, match=f"norms and biases alone need {need} bytes.*budget_bytes={need - 1}"):
        allocate(spectra, need - 1, header=header)


def _model_error(m, tiers, g, kappa=1.0):
    """Estimated Σ squared error of keeping `tiers` [(bits, rank)] of module m (the error model, by hand),
    rounding noise weighted by `kappa`."""
    err, start = sum(m.sq), 0
    for bits, r in tiers:
        err -= sum(m.sq[start:start + r]) * (1 - kappa * rank_error(bits, g, m.out_features, m.in_features))
        start += r
    return err


@pytest.mark.parametrize("fraction", [1 / 32, 1 / 16, 1 / 4])
@pytest.mark.parametrize("decay", [0.3, 1.0])
@pytest.mark.parametrize("kappa", [1.0, NOISE_WEIGHT])
def test_allocation_is_near_the_brute_force_optimum(fraction, decay, kappa):
    out_f, in_f, g = 40, 64, 32
    sq = [(i + 1) ** (-2 * decay) for i in range(out_f)]
    m = LowRankModule("m", "mlp", out_f, in_f, sq, (g,))
    budget = int(out_f * in_f * 2 * fraction)
    cost = {b: rank_bytes(in_f, out_f, b, g) for b in (8, 4, 2)}
    best = sum(sq)
    for n8 in range(out_f + 1):
        for n4 in range(out_f + 1 - n8):
            left = budget - n8 * cost[8] - n4 * cost[4]
            if left < 0:
                break
            n2 = min(out_f - n8 - n4, left // cost[2])
            best = min(best, _model_error(m, [(8, n8), (4, n4), (2, n2)], g, kappa))
    plan = allocate([m], budget, noise_weight=kappa)["m"]
    assert plan.est_bytes <= budget
    assert plan.est_error_sq == pytest.approx(_model_error(m, plan.tier_ranks, g, kappa), rel=1e-9)
    assert plan.est_error_sq <= best * 1.02 + 1e-12, (plan.tier_ranks, plan.est_error_sq, best)


def _synthetic_delta(out_f, in_f, seed, decay=0.6, noise=0.3):
    """A fine-tune-like delta: power-law singular spectrum plus dense noise."""
    gen = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen, dtype=torch.float64))
    d = (u * torch.arange(1, k + 1, dtype=torch.float64) ** -decay) @ v.T
    n = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    return (d + noise * n * d.norm() / n.norm()).float()


@pytest.mark.parametrize("fraction,decay,noise", [(1 / 16, 0.6, 0.3), (1 / 32, 0.3, 0.5)])
def test_allocation_beats_delta_come_at_equal_bytes(fraction, decay, noise):
    deltas = {f"model.layers.0.mlp.{p}_proj.weight": _synthetic_delta(o, i, seed, decay, noise)
              for seed, (p, o, i) in enumerate([("up", 384, 128), ("down", 128, 384), ("gate", 384, 128)])}
    budget = int(sum(d.numel() * 2 for d in deltas.values()) * fraction)
    ours_bytes, ours_err = _compress(deltas, allocate(_spectra(deltas), budget, noise_weight=1.0))
    theirs, theirs_bytes = compress_deltas(deltas, "delta_come", budget)
    theirs_err = sum(float((d.double() - theirs[n].double()).square().sum()) for n, d in deltas.items())
    assert ours_bytes <= budget and theirs_bytes <= budget
    assert ours_err <= theirs_err, (ours_err, theirs_err)


def test_discounted_noise_keeps_more_ranks_at_fewer_bits():
    """κ < 1 (the builder's default) spends the same bytes on more ranks, mostly at 2 bits."""
    out_f, in_f, g = 96, 160, 32
    sq = [(i + 1) ** -0.8 for i in range(out_f)]
    m = LowRankModule("m", "mlp", out_f, in_f, sq, (g,))
    budget = int(out_f * in_f * 2 / 16)
    frob, default = allocate([m], budget, noise_weight=1.0)["m"], allocate([m], budget)["m"]
    rank = lambda p: sum(r for _, r in p.tier_ranks)  # noqa: E731
    assert default.est_bytes <= budget and frob.est_bytes <= budget
    assert rank(default) > rank(frob), (default.tier_ranks, frob.tier_ranks)
    assert dict((b, r) for b, r in default.tier_ranks).get(2, 0) > rank(default) / 2
    with pytest.raises(ValueError, match="noise_weight=0"):
        allocate([m], budget, noise_weight=0)


def test_budgets_parse_and_print():
    assert parse_budget("1/16") == 1 / 16 and parse_budget("0.25") == 0.25
    assert budget_label(1 / 32) == "1/32" and budget_label(0.3) == "0.3"
    for bad in ("0", "3/2", "a/b", "1/0"):
        with pytest.raises(ValueError, match=f"budget '{bad}'"):
            parse_budget(bad)
