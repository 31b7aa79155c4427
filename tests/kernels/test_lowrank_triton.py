"""Triton shrink/expand kernels against the torch twin and a float64 dense reference (interpreter on CPU)."""
import pytest
import torch

from kernels.lowrank_expand import expand_decode, expand_segment
from kernels.lowrank_ops import add_lowrank, expand_torch, shrink_torch
from kernels.lowrank_shrink import shrink_decode, shrink_segment
from kernels.routing import RowPacks
from tests.kernels.delta_cases import TOLERANCES, dense_reference, load_slots, make_delta, row_mix

# odd feature sizes; ranks 1 and non-multiples of 16; every bit width alone and mixed; several group sizes
IN_F, OUT_F = 72, 47
PACKS = [
    ([(1, 8)], 16),
    ([(5, 8), (6, 4), (6, 2)], 32),
    ([(9, 4)], 8),
    ([(3, 2), (4, 2)], 128),
]


def make_deltas(in_f=IN_F, out_f=OUT_F, packs=PACKS):
    return [make_delta(in_f, out_f, tiers, group_size=gs, seed=10 + i) for i, (tiers, gs) in enumerate(packs)]


def batch(rows, dtype, seed, in_f=IN_F, out_f=OUT_F):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_f, generator=g).to(dtype), torch.randn(rows, out_f, generator=g).to(dtype)


def rank_mask(slots, routing):
    """(pairs, max_rank) bool: the t entries a shrink must write."""
    ranks = slots.rank[routing.pair_slot.long()]
    return torch.arange(slots.max_rank)[None, :] < ranks[:, None]


@pytest.mark.parametrize("shape", ["decode", "segment"])
@pytest.mark.parametrize("splits", [1, 2])
def test_shrink_matches_twin_and_float64(shape, splits):
    ds = make_deltas()
    slots = load_slots(ds, max_rank=24)
    mix = row_mix("fused", 11, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, _ = batch(11, torch.float32, 1)
    t = torch.full((splits, rp.num_pairs, slots.max_rank), float("nan"))  # poison: every needed entry is written
    if shape == "decode":
        shrink_decode(x, t, slots, rp, block_r=16, block_k=16 if splits == 1 else 32)
    else:
        shrink_segment(x, t, slots, rp, block_m=16, block_r=16, block_k=16, lowp=0)
    need = rank_mask(slots, rp)
    got = t.sum(0)
    assert torch.isfinite(got[need]).all()
    twin = shrink_torch(x, slots, rp)
    torch.testing.assert_close(got[need], twin[need], atol=1e-5, rtol=1e-5)
    for j, (row, slot) in enumerate(zip(rp.pair_row.tolist(), rp.pair_slot.tolist())):
        a = ds[slot].factors(torch.float64)[0]
        torch.testing.assert_close(got[j, : ds[slot].rank].double(), a @ x[row].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", ["decode", "segment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_matches_twin_and_float64(shape, dtype):
    ds = make_deltas()
    slots = load_slots(ds, max_rank=24)
    mix = row_mix("fused", 13, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, y = batch(13, dtype, 2)
    twin_t = shrink_torch(x, slots, rp)
    # split the partial sums in two, with NaN past each slot's rank that the kernel must not read
    t = torch.stack([0.25 * twin_t, 0.75 * twin_t])
    t[:, ~rank_mask(slots, rp)] = float("nan")
    y_kernel, y_twin = y.clone(), y.clone()
    if shape == "decode":
        expand_decode(y_kernel, t, slots, rp, block_r=16, block_n=16)
    else:
        expand_segment(y_kernel, t, slots, rp, block_m=16, block_r=16, block_n=16, lowp=0)
    expand_torch(y_twin, twin_t, slots, rp)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y_kernel.float(), y_twin.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert base and torch.equal(y_kernel[base], y[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identical", "distinct", "skewed", "base_rows", "fused"])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("shape", ["decode", "segment"])
def test_add_lowrank_matches_twin_and_float64(dtype, kind, rows, shape):
    ds = make_deltas()
    slots = load_slots(ds, dtype)
    mix = row_mix(kind, rows, len(ds), seed=rows)
    rp = RowPacks.build(mix, "cpu")
    x, y = batch(rows, dtype, rows)
    y_kernel, y_twin = y.clone(), y.clone()
    add_lowrank(y_kernel, x, slots, rp, backend="triton", shape=shape)
    add_lowrank(y_twin, x, slots, rp, backend="torch")
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y_kernel.float(), y_twin.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert torch.equal(y_kernel[base], y[base])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_bit_width_alone_with_rank_past_one_block(bits):
    ds = [make_delta(40, 33, [(19, bits)], group_size=8, seed=bits)]
    slots = load_slots(ds)
    mix = [[(0, 0.5)], [], [(0, 2.0)]]
    x, y = batch(3, torch.float32, bits, 40, 33)
    y_kernel = y.clone()
    add_lowrank(y_kernel, x, slots, RowPacks.build(mix, "cpu"), backend="triton", shape="decode")
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=2e-4, rtol=2e-4)
    assert torch.equal(y_kernel[1], y[1])


def test_cleared_and_reloaded_slot_reads_the_new_pack():
    old, new = make_delta(IN_F, OUT_F, [(8, 8)], seed=1), make_delta(IN_F, OUT_F, [(3, 2)], seed=2)
    slots = load_slots([old], max_rank=8)
    slots.clear(0)
    slots.load(0, new)
    mix = [[(0, 1.0)]] * 4
    x, y = batch(4, torch.float32, 3)
    y_kernel = y.clone()
    add_lowrank(y_kernel, x, slots, RowPacks.build(mix, "cpu"), backend="triton")
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, [new], mix), atol=2e-4, rtol=2e-4)
