"""Baselines against their obvious definitions: BitDelta, DARE, fp16 SVD, Delta-CoMe tiers, byte counts."""
import math

import pytest
import torch

from skillpack_kernels.quant import dequantize_groupwise, quantize_groupwise
from skillpack_evals import baselines as B


def low_rank_delta(out_f=48, in_f=80, rank=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) * 0.01 \
        + 1e-4 * torch.randn(out_f, in_f, generator=g)


def test_bitdelta_is_sign_times_mean_abs_and_one_bit_per_weight():
    d = low_rank_delta()
    d[0, 0] = 0.0
    res = B.bitdelta(d)
    scale = d.abs().mean()
    for i in range(d.shape[0]):
        for j in range(0, d.shape[1], 7):
            want = (1.0 if d[i, j] >= 0 else -1.0) * scale
            assert res.delta[i, j].item() == pytest.approx(want.item(), rel=1e-3)
    assert res.nbytes == math.ceil(48 * 80 / 8) + 2


def test_dare_is_unbiased_over_many_draws_and_counts_survivors():
    d = low_rank_delta(16, 24)
    share = d.numel() // 2 * 6 + 5  # room for half the entries
    gen = torch.Generator().manual_seed(7)
    draws = [B.dare(d, share, gen) for _ in range(4000)]
    mean = torch.stack([r.delta for r in draws]).mean(dim=0)
    # each entry is d/k with probability k: the mean of 4000 draws has std |d|·sqrt((1-k)/k/4000)
    tol = 5 * d.abs() * math.sqrt(1 / 4000) + 1e-6
    assert ((mean - d).abs() <= tol).all()
    for r in draws[:20]:
        survivors = r.delta != 0
        assert int(survivors.sum()) == d.numel() // 2 and r.nbytes == 6 * (d.numel() // 2)
        assert torch.allclose(r.delta[survivors], (d[survivors] * 2).half().float())
    # every entry survives in about half of the draws
    survival = torch.stack([r.delta != 0 for r in draws]).float().mean(dim=0)
    assert ((survival - 0.5).abs() < 0.05).all()


def test_lowrank_fp16_rank_fits_bytes_and_matches_truncated_svd():
    d = low_rank_delta()
    per_rank = 2 * (48 + 80)
    res = B.lowrank_fp16(d, 4 * per_rank + per_rank - 1)
    assert res.nbytes == 4 * per_rank == B.lowrank_fp16_bytes(4, 48, 80)
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    want = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(res.delta.double(), want, atol=2e-3 * d.abs().max().item())  # fp16 factors
    assert (res.delta - d).norm() > 10 * (res.delta.double() - want).norm()  # rank 4 < true rank 6
    assert B.lowrank_fp16(d, per_rank - 1).nbytes == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_matches_the_packed_layout_round_trip(bits):
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(B.fake_quantize(w, bits, 32), dequantize_groupwise(quantize_groupwise(w, bits, 32)))


def test_three_bit_fake_quantize_uses_eight_levels_per_group_within_half_a_step():
    w = torch.randn(3, 70, generator=torch.Generator().manual_seed(1))
    q = B.fake_quantize(w, 3, 32)  # 70 columns: groups of 32, 32 and a padded 6
    for g in range(3):
        cols = slice(32 * g, min(32 * (g + 1), 70))
        block_w, block_q = w[:, cols], q[:, cols]
        for r in range(3):
            assert len(torch.unique(block_q[r])) <= 8
            step = (block_w[r].max() - block_w[r].min()) / 7
            assert (block_q[r] - block_w[r]).abs().max() <= step / 2 + 1e-3 * step + 1e-3


def test_delta_come_tiers_and_bytes_formula():
    assert B.delta_come_tiers(1) == [(1, 8)]
    assert B.delta_come_tiers(10) == [(2, 8), (8, 3)]
    assert B.delta_come_tiers(40) == [(2, 8), (32, 3), (6, 2)]
    # rank 10 of a (48 out, 80 in) matrix, group 64: columns pad to 64 (out) and 128 (in)
    want = 4 * 10 + (2 * 128 + 2 * 64) * 8 // 8 + 2 * (2 + 1) * 4 \
        + math.ceil(8 * 128 * 3 / 8) + math.ceil(8 * 64 * 3 / 8) + 8 * (2 + 1) * 4
    assert B.delta_come_bytes(10, 48, 80, 64) == want


def test_delta_come_fits_its_bytes_and_approaches_the_delta():
    d = low_rank_delta()
    res = B.delta_come(d, 4000)
    assert 0 < res.nbytes <= 4000
    err = (res.delta - d).norm() / d.norm()
    assert err < 0.25
    assert B.delta_come(d, 10).nbytes == 0


def test_compress_deltas_keeps_vectors_exact_and_respects_the_budget():
    deltas = {"w1": low_rank_delta(48, 80, seed=1), "w2": low_rank_delta(64, 32, seed=2),
              "norm": torch.randn(48) * 1e-3}
    fp16 = sum(v.numel() * 2 for v in deltas.values())
    for method in ("lowrank_fp16", "dare", "delta_come"):
        out, used = B.compress_deltas(deltas, method, fp16 // 4)
        assert used <= fp16 // 4
        assert torch.equal(out["norm"], deltas["norm"])
        assert set(out) == set(deltas)
    out, used = B.compress_deltas(deltas, "bitdelta", fp16 // 4)
    assert used == 48 * 4 + math.ceil(48 * 80 / 8) + 2 + math.ceil(64 * 32 / 8) + 2
    with pytest.raises(ValueError, match="unknown baseline 'zip'"):
        B.compress_deltas(deltas, "zip", fp16)
    out, used = B.compress_deltas(deltas, "dare", 300)  # too small for the exact norm: it is dropped
    assert not out["norm"].any() and 0 < used <= 300
    with pytest.raises(ValueError, match="must be positive"):
        B.compress_deltas(deltas, "dare", 0)
