"""`add_lowrank` on Triton (shrink then expand) against the torch path and a float64 dense reference
(interpreter on CPU); each kernel alone is tested beside its twin in test_lowrank_shrink/_expand."""
import pytest
import torch

from skillpack_kernels.lowrank_ops import add_lowrank
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import (
    IN_F, OUT_F, TOLERANCES, batch, check_add_lowrank, dense_reference, load_slots, make_delta, make_deltas, row_mix,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identical", "distinct", "skewed", "base_rows", "fused"])
# decode tiles hold 16 pairs, segment tiles 64: 40 rows fill neither, and cross one decode tile
@pytest.mark.parametrize("rows,shape", [(1, "decode"), (7, "decode"), (40, "decode"), (40, "segment")])
def test_add_lowrank_matches_twin_and_float64(dtype, kind, rows, shape):
    ds = make_deltas()
    slots = load_slots(ds, dtype)
    mix = row_mix(kind, rows, len(ds), seed=rows)
    x, y = batch(rows, dtype, rows)
    check_add_lowrank(y, x, slots, RowPacks.build(mix, "cpu"), ds, mix, *TOLERANCES[dtype], shape=shape)


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
