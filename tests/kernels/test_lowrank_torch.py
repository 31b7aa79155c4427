"""The torch twin and the slot storage against a float64 dense reference built from dequantize_groupwise."""
import pytest
import torch

from kernels.lowrank_ops import LowRankSlots, add_lowrank, expand_torch, shrink_torch
from kernels.routing import RowPacks
from tests.kernels.delta_cases import TOLERANCES, dense_reference, load_slots, make_delta, row_mix

IN_F, OUT_F = 72, 56
TIER_MIXES = [[(8, 4)], [(1, 8)], [(5, 8), (6, 4), (7, 2)], [(3, 2), (9, 2)]]


def deltas(seed=0):
    return [make_delta(IN_F, OUT_F, tiers, group_size=32 if i % 2 else 16, seed=seed + i)
            for i, tiers in enumerate(TIER_MIXES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identical", "distinct", "skewed", "base_rows", "fused"])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_twin_matches_dense_reference(dtype, kind, rows):
    ds = deltas()
    slots = load_slots(ds, dtype)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN_F, generator=g).to(dtype)
    y = torch.randn(rows, OUT_F, generator=g).to(dtype)
    mix = row_mix(kind, rows, len(ds))
    y0 = y.clone()
    add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"), backend="torch")
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), dense_reference(y0, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert torch.equal(y[base], y0[base])


def test_shrink_and_expand_twins_split_the_work():
    ds = deltas()
    slots = load_slots(ds)
    mix = row_mix("fused", 9, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x = torch.randn(9, IN_F, dtype=torch.float64).float()
    t = shrink_torch(x, slots, rp)
    for j, (row, slot) in enumerate(zip(rp.pair_row.tolist(), rp.pair_slot.tolist())):
        a, _ = ds[slot].factors(torch.float64)
        torch.testing.assert_close(t[j, : ds[slot].rank].double(), a @ x[row].double(), atol=1e-5, rtol=1e-5)
        assert not t[j, ds[slot].rank :].any()
    y = torch.zeros(9, OUT_F)
    expand_torch(y, t, slots, rp)
    torch.testing.assert_close(y.double(), dense_reference(torch.zeros(9, OUT_F), x, ds, mix), atol=1e-4, rtol=1e-4)


def test_storage_reads_back_every_tier_and_survives_growth_and_clear():
    small = make_delta(IN_F, OUT_F, [(2, 2)], seed=5)
    big = make_delta(IN_F, OUT_F, [(4, 8), (4, 4)], group_size=8, seed=6)
    wide = make_delta(IN_F, OUT_F, [(3, 2), (17, 2)], seed=7)  # one pool, two tiers, past one row block
    slots = LowRankSlots(IN_F, OUT_F, 3, 20, "cpu", torch.float32)
    slots.load(0, small)
    slots.load(2, big)
    assert set(slots.pools) == {(2, 32), (8, 8), (4, 8)}
    before = slots.pools[(2, 32)].cap
    slots.load(1, wide)  # the 2-bit pool grows; slot 0 must keep its bytes
    assert slots.pools[(2, 32)].cap > before
    for slot, d in ((0, small), (2, big), (1, wide)):
        slots._dense.pop(slot)  # read through the pools, not the CPU copy
        a, s, b = slots.factors(slot)
        ra, rb = d.factors()
        assert torch.equal(a, ra) and torch.equal(b, rb) and torch.equal(s, d.s)
    slots.clear(2)
    assert slots.loaded == {0, 1} and int(slots.rank[2]) == 0
    assert set(slots.pools) == {(2, 32)}  # pools nobody uses are dropped
    with pytest.raises(ValueError, match="slots \\[2\\]"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, IN_F), slots, RowPacks.build([[(2, 1.0)]], "cpu"))


def test_memory_follows_bits_used():
    two = load_slots([make_delta(256, 256, [(16, 2)])], max_rank=64, num_slots=4)
    eight = load_slots([make_delta(256, 256, [(16, 8)])], max_rank=64, num_slots=4)
    assert two.pools[(2, 32)].a.codes.numel() * 4 == eight.pools[(8, 32)].a.codes.numel()
    assert two.nbytes < eight.nbytes


def test_bad_inputs_are_refused_with_the_value():
    d = make_delta(IN_F, OUT_F, [(4, 4)])
    slots = load_slots([d], max_rank=4)
    with pytest.raises(ValueError, match="rank 8 exceeds"):
        slots.load(0, make_delta(IN_F, OUT_F, [(8, 4)]))
    with pytest.raises(ValueError, match="slot=1"):
        slots.load(1, d)
    with pytest.raises(ValueError, match="delta is 56 -> 72"):
        slots.load(0, make_delta(OUT_F, IN_F, [(4, 4)]))
    with pytest.raises(ValueError, match="num_slots=0"):
        LowRankSlots(8, 8, 0, 4, "cpu", torch.float32)
    rp = RowPacks.build([[(0, 1.0)]], "cpu")
    with pytest.raises(ValueError, match=r"x has shape \(1, 3\)"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, 3), slots, rp)
    with pytest.raises(ValueError, match="routing covers 1 rows but x has 2"):
        add_lowrank(torch.zeros(2, OUT_F), torch.zeros(2, IN_F), slots, rp)
    with pytest.raises(ValueError, match="backend='cuda'"):
        add_lowrank(torch.zeros(1, OUT_F), torch.zeros(1, IN_F), slots, rp, backend="cuda")


def test_empty_routing_leaves_y_alone():
    slots = load_slots([make_delta(IN_F, OUT_F, [(4, 4)])])
    y = torch.full((3, OUT_F), float("nan"))
    add_lowrank(y, torch.zeros(3, IN_F), slots, RowPacks.build([[], [], []], "cpu"))
    assert y.isnan().all()
