"""Quantization primitives against slow obvious versions and stated error bounds."""
import pytest
import torch

from skillpack_kernels.factors import LowRankDelta, factor_tiers_of_many
from skillpack_kernels.quant import (
    QuantTensor, dequantize_groupwise, dequantize_many, pack_codes, padded_cols, quantize_groupwise, unpack_codes,
)


def slow_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    out = torch.zeros(q.shape[0], q.shape[1] // per, dtype=torch.uint8)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c // per] |= int(q[r, c]) << ((c % per) * bits)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_matches_slow_version_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (3, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(q, bits)
    assert torch.equal(packed, slow_pack(q, bits))
    assert torch.equal(unpack_codes(packed, bits), q)


@pytest.mark.parametrize("bits,bound", [(8, 0.5 / 255), (4, 0.5 / 15), (2, 0.5 / 3)])
@pytest.mark.parametrize("cols,group", [(64, 32), (100, 32), (7, 8)])
def test_round_trip_error_within_half_step(bits, bound, cols, group):
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(5, cols, generator=g)
    qt = quantize_groupwise(w, bits, group)
    qt.validate()
    assert qt.codes.shape == (5, padded_cols(cols, group) * bits // 8)
    back = dequantize_groupwise(qt)
    assert back.shape == w.shape
    # error of round-to-nearest is half a step of each group's range (+ fp16 rounding)
    pad = torch.cat([w, w[:, -1:].expand(5, padded_cols(cols, group) - cols)], 1)
    rng = pad.view(5, -1, group).amax(-1) - pad.view(5, -1, group).amin(-1)
    step_bound = (rng * bound * 1.02 + 1e-3).repeat_interleave(group, dim=1)[:, :cols]
    assert ((back - w).abs() <= step_bound).all()


def test_constant_rows_are_exact():
    w = torch.full((2, 16), 0.25)
    assert torch.equal(dequantize_groupwise(quantize_groupwise(w, 2, 8)), w)


def test_bad_layout_is_refused_with_the_value():
    with pytest.raises(ValueError, match="bits=3"):
        quantize_groupwise(torch.zeros(2, 8), 3, 8)
    with pytest.raises(ValueError, match="group_size=12"):
        quantize_groupwise(torch.zeros(2, 8), 4, 12)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_groupwise(torch.tensor([[float("nan")] * 8]), 4, 8)
    qt = quantize_groupwise(torch.randn(2, 16), 4, 8)
    bad = QuantTensor(qt.codes[:, :-1], qt.scales, qt.zeros, 4, 8, 16)
    with pytest.raises(ValueError, match="codes"):
        bad.validate()


def test_exact_rank_r_delta_reconstructs_at_8_bits():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 48, 40, 4
    u, _ = torch.linalg.qr(torch.randn(out_f, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, r, generator=g))
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    dw = (u * s) @ v.T
    d = LowRankDelta([quantize_groupwise(v.T, 8, 8)], [quantize_groupwise(u.T, 8, 8)], s, in_f, out_f)
    d.validate()
    rel = (d.dense() - dw.double()).norm() / dw.norm()
    assert rel <= 1e-2


def test_dequantize_many_equals_one_at_a_time():
    torch.manual_seed(3)
    parts = [quantize_groupwise(torch.randn(rows, cols), bits, gs)
             for rows, cols, bits, gs in [(3, 40, 4, 16), (5, 40, 4, 16), (2, 33, 2, 8), (4, 40, 8, 32),
                                          (1, 33, 2, 8), (6, 40, 4, 16)]]
    for one, many in zip([dequantize_groupwise(p) for p in parts], dequantize_many(parts)):
        assert torch.equal(one, many)
    for p, many in zip(parts, dequantize_many(parts, torch.float64)):
        q = unpack_codes(p.codes, p.bits).double().view(p.rows, -1, p.group_size)
        want = (q * p.scales.double().unsqueeze(-1) + p.zeros.double().unsqueeze(-1)).view(p.rows, -1)[:, : p.cols]
        torch.testing.assert_close(many, want, atol=1e-6, rtol=0)


def test_factor_tiers_of_many_equal_each_deltas_factors():
    torch.manual_seed(4)

    def delta(in_f, out_f, tiers):
        a = [quantize_groupwise(torch.randn(r, in_f), b, 16) for r, b in tiers]
        bt = [quantize_groupwise(torch.randn(r, out_f), b, 16) for r, b in tiers]
        return LowRankDelta(a, bt, torch.rand(sum(r for r, _ in tiers)), in_f, out_f)

    deltas = [delta(40, 24, [(3, 8), (5, 4)]), delta(24, 40, [(2, 4), (4, 2)]), delta(40, 24, [(6, 2)])]
    for d, (a, bt) in zip(deltas, factor_tiers_of_many(deltas)):
        want_a, want_b = d.factors()
        assert [t.shape[0] for t in a] == [t.shape[0] for t in bt] == d.tier_ranks
        assert torch.equal(torch.cat(a), want_a) and torch.equal(torch.cat(bt).T, want_b)
