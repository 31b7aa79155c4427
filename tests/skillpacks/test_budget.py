"""Budget allocation: bytes respected, tiers well formed, and less error than a uniform split."""
import pytest
import torch
from safetensors.torch import load_file

from skillpacks.budget import (
    ExactModule, HeaderCost, LowRankModule, SparseModule, allocate, sparse_grid, sparse_spectrum, uniform_plans,
    vector_error,
)
from skillpacks.compress import (
    choose_group_size, delta_svd, exact_delta, lowrank_delta, sparse_delta,
)
from skillpacks.module_kinds import module_kind, storage_method


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
            modules.append(LowRankModule(name, kind, d.shape[0], d.shape[1], sq, choose_group_size(d.shape[1], d.shape[0])))
        elif method == "sparse":
            counts = sparse_grid(d.numel())
            modules.append(SparseModule(name, kind, d.numel(), counts, sparse_spectrum(d, counts), float(d.double().square().sum())))
        else:
            modules.append(ExactModule(name, kind, d.numel() * 4, float(d.double().square().sum())))
    return modules


def _compress(deltas, plans):
    """Compress by plans; return (payload bytes, measured Σ‖Δ − Δ̂‖²)."""
    total_bytes, err = 0, 0.0
    for name, d in deltas.items():
        plan = plans[name]
        if plan.method == "lowrank":
            u, s, vh = delta_svd(d)
            obj = lowrank_delta(u, s, vh, plan.tier_ranks, plan.group_size)
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


@pytest.mark.parametrize("budget", [3_000, 20_000, 80_000])
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
    alloc_bytes, alloc_err = _compress(deltas, allocate(spectra, uniform_bytes))
    assert alloc_bytes <= uniform_bytes
    assert alloc_err < uniform_err, (alloc_err, uniform_err)


def test_estimated_error_tracks_measured_error(tiny_pairs):
    deltas = _deltas(tiny_pairs["llama"])
    plans = allocate(_spectra(deltas), 40_000)
    _, measured = _compress(deltas, plans)
    estimated = sum(p.est_error_sq for p in plans.values())
    assert 0.7 * measured <= estimated <= 1.3 * measured


def test_allocation_rejects_negative_budget():
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        allocate([], -1)
