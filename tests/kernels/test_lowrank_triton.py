"""Triton shrink/expand kernels against the torch twin and a float64 dense reference (interpreter on CPU)."""
import pytest
import torch

from skillpack_kernels.lowrank_expand import expand
from skillpack_kernels.lowrank_ops import add_lowrank, expand_torch, shrink_torch
from skillpack_kernels.lowrank_shrink import shrink
from skillpack_kernels.lowrank_triton import pool_columns
from skillpack_kernels.quant import dequantize_groupwise
from skillpack_kernels.row_packs import RowPacks
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


def pool_t64(x, slots, routing):
    """float64 (pairs, t width) the shrink must produce, from each pool's codes read back, and a mask
    of the entries it must write (each pair's rows in each pool)."""
    pools, cols, width = pool_columns(slots)
    want = torch.zeros(routing.num_pairs, width, dtype=torch.float64)
    need = torch.zeros(routing.num_pairs, width, dtype=torch.bool)
    for j, (row, slot) in enumerate(zip(routing.pair_row.tolist(), routing.pair_slot.tolist())):
        for p, col in zip(pools, cols):
            n = p.rows[slot]
            if n:
                a = dequantize_groupwise(p.a.read(slot, 0, n), torch.float64)
                want[j, col : col + n] = a @ x[row].double()
                need[j, col : col + n] = True
    return want, need


def run_in_groups(fn, slots, *args):
    """Call a launcher for every three pools, as add_lowrank_triton does."""
    pools, cols, _ = pool_columns(slots)
    for i in range(0, len(pools), 3):
        fn(pools[i : i + 3], cols[i : i + 3], *args)


@pytest.mark.parametrize("splits", [1, 2])
def test_shrink_matches_float64_pool_by_pool(splits):
    ds = make_deltas(in_f=200)
    slots = load_slots(ds, max_rank=24)
    assert len(slots.pools) > 3  # two launches' worth of pools
    mix = row_mix("fused", 11, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, _ = batch(11, torch.float32, 1, in_f=200)
    _, _, width = pool_columns(slots)
    k_split = 128 if splits == 2 else 256
    t = torch.full((splits, rp.num_pairs, width), float("nan"))  # poison: every needed entry is written
    tiles = rp.tiles(16)
    run_in_groups(lambda pools, cols: shrink(x, t, pools, cols, tiles, rp, 16, 16, k_split, 0), slots)
    want, need = pool_t64(x, slots, rp)
    got = t.sum(0)
    assert torch.isfinite(got[need]).all()
    torch.testing.assert_close(got[need].double(), want[need], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,splits,block_m", [(torch.float32, 2, 16), (torch.bfloat16, 2, 16),
                                                  (torch.float32, 5, 64)])
def test_expand_matches_twin_and_float64(dtype, splits, block_m):
    ds = make_deltas()
    slots = load_slots(ds, max_rank=24)
    mix = row_mix("fused", 13, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, y = batch(13, dtype, 2)
    want, need = pool_t64(x.float(), slots, rp)
    # split the partial sums (more splits than one wide load takes at block_m 64), with NaN past
    # each pair's rows that the kernel must not read
    shares = torch.linspace(1.0, 2.0, splits, dtype=torch.float64)
    t = torch.stack([want * (c / shares.sum()) for c in shares]).float()
    t[:, ~need] = float("nan")
    y_kernel, y_twin = y.clone(), y.clone()
    tiles = rp.tiles(block_m)
    run_in_groups(lambda pools, cols: expand(y_kernel, t, pools, cols, tiles, rp, block_m, 16, 16, 0), slots)
    expand_torch(y_twin, shrink_torch(x, slots, rp), slots, rp)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y_kernel.float(), y_twin.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=atol, rtol=rtol)
    base = [i for i, p in enumerate(mix) if not p]
    assert base and torch.equal(y_kernel[base], y[base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identical", "distinct", "skewed", "base_rows", "fused"])
# decode tiles hold 16 pairs, segment tiles 64: 40 rows fill neither, and cross one decode tile
@pytest.mark.parametrize("rows,shape", [(1, "decode"), (7, "decode"), (40, "decode"), (40, "segment")])
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


def poison_pool_padding(factor, slot_rows):
    """NaN into every scale and zero the kernels must never read: the rows past each slot's rank,
    and (the tensors moved into a longer NaN buffer) the memory just past the pool's end."""
    for name in ("scales", "zeros"):
        data = getattr(factor, name)
        for slot, rows in enumerate(slot_rows):
            data[slot, rows:] = float("nan")
        buf = torch.full((data.numel() + 4 * data.shape[-1],), float("nan"), dtype=data.dtype)
        buf[: data.numel()] = data.flatten()
        setattr(factor, name, buf[: data.numel()].view(data.shape))


@pytest.mark.parametrize("group_size", [64, 128])
def test_shrink_reads_no_scale_past_in_features(group_size):
    """576 inputs (SmolLM2): the last 128-column block is half empty. With groups as wide as
    the K chunk the chunk past in_features must read neither the next row's group (slot 0's
    padding rows) nor past the pool's end (slot 1 fills the pool to its last row)."""
    ds = [make_delta(576, 40, [(8, 4)], group_size=group_size, seed=1),
          make_delta(576, 40, [(16, 4)], group_size=group_size, seed=2)]
    slots = load_slots(ds, max_rank=16)
    (pool,) = slots.pools.values()
    assert pool.cap == 16
    poison_pool_padding(pool.a, [8, 16])
    poison_pool_padding(pool.b, [8, 16])
    mix = [[(0, 1.0)], [(1, 1.0)], [], [(1, 0.5), (0, 2.0)]]
    x, y = batch(len(mix), torch.float32, 5, 576, 40)
    y_kernel = y.clone()
    add_lowrank(y_kernel, x, slots, RowPacks.build(mix, "cpu"), backend="triton", shape="decode")
    assert torch.isfinite(y_kernel).all()
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=2e-4, rtol=2e-4)
