"""The expand kernel and its torch twin, on the same t, against a float64 dense reference (interpreter on CPU)."""
import pytest
import torch

from skillpack_kernels.lowrank_expand import expand, expand_torch
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import (
    TOLERANCES, batch, dense_reference, in_launches, load_slots, make_deltas, row_mix, shrink_reference,
)


def split_t(want: torch.Tensor, need: torch.Tensor, splits: int) -> torch.Tensor:
    """float32 t (splits, pairs, width) whose splits add up to `want` (1, pairs, width), NaN where not `need`."""
    shares = torch.linspace(1.0, 2.0, splits, dtype=torch.float64)
    t = torch.stack([want[0] * (c / shares.sum()) for c in shares]).float()
    t[:, ~need] = float("nan")  # the kernels must not read past each pair's rows
    return t


# out_features 47 and 33 (odd, not a multiple of a group); 2 splits, and 5 (more than one wide
# load at block_m 64); fused rows need two passes; base-only rows stay bitwise untouched
@pytest.mark.parametrize("out_f,splits,block_m", [(47, 2, 16), (33, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_expand_kernel_and_twin_match_float64(out_f, splits, block_m, dtype):
    ds = make_deltas(out_f=out_f)
    slots = load_slots(ds, max_rank=24)
    mix = row_mix("fused", 13, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, y = batch(13, dtype, 2, out_f=out_f)
    pools, cols, _ = slots.pool_columns()
    t = split_t(*shrink_reference(x, ds, pools, cols, rp, 1, 128), splits)
    y_kernel, y_twin = y.clone(), y.clone()
    in_launches(expand, slots, y_kernel, t, rp, block_m=block_m, block_r=16, block_n=16)
    in_launches(expand_torch, slots, y_twin, t, rp)
    want = dense_reference(y, x, ds, mix)
    atol, rtol = TOLERANCES[dtype]
    base = [i for i, p in enumerate(mix) if not p]
    assert base
    for got in (y_kernel, y_twin):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
        assert torch.equal(got[base], y[base])
    torch.testing.assert_close(y_kernel.float(), y_twin.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_n", [32, 128])
def test_wide_output_blocks_fold_zeros_only_inside_one_group(block_n):
    """Output blocks wider than a pool's group (8, 16, 32) take the per-element scale path, the rest fold zeros."""
    ds = make_deltas(out_f=200)
    slots = load_slots(ds, max_rank=24)
    mix = row_mix("distinct", 9, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, y = batch(9, torch.float32, 4, out_f=200)
    pools, cols, _ = slots.pool_columns()
    t = split_t(*shrink_reference(x, ds, pools, cols, rp, 1, 128), 1)
    y_kernel = y.clone()
    in_launches(expand, slots, y_kernel, t, rp, block_n=block_n)
    torch.testing.assert_close(y_kernel.double(), dense_reference(y, x, ds, mix), atol=2e-4, rtol=2e-4)
