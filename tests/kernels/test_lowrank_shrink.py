"""The shrink kernel and its torch twin, on the same inputs, against a float64 reference split by split
(interpreter on CPU)."""
import pytest
import torch

from skillpack_kernels.lowrank_shrink import shrink, shrink_torch
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import batch, in_launches, load_slots, make_deltas, row_mix, shrink_reference


# in_features 72 and 200 (not multiples of a group or a 128-column block); 200 inputs in one split
# of 256 or two of 128; more than three pools, so two launches; x in each activation dtype (the
# interpreter multiplies in float32, so one tolerance: the float32 sums' rounding)
@pytest.mark.parametrize("in_f,splits,k_split", [(72, 1, 128), (200, 1, 256), (200, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,kind", [(1, "identical"), (11, "fused")])
def test_shrink_kernel_and_twin_match_float64(in_f, splits, k_split, dtype, rows, kind):
    ds = make_deltas(in_f=in_f)
    slots = load_slots(ds, max_rank=24)
    assert len(slots.pools) > 3
    mix = row_mix(kind, rows, len(ds))
    rp = RowPacks.build(mix, "cpu")
    x, _ = batch(rows, dtype, rows, in_f=in_f)
    pools, cols, width = slots.pool_columns()
    want, need = shrink_reference(x, ds, pools, cols, rp, splits, k_split)
    t_kernel = torch.full((splits, rp.num_pairs, width), float("nan"))  # poison: every written entry is checked
    t_twin = t_kernel.clone()
    in_launches(shrink, slots, x, t_kernel, rp, k_split, block_m=16, block_r=16)
    in_launches(shrink_torch, slots, x, t_twin, rp, k_split)
    for t in (t_kernel, t_twin):
        torch.testing.assert_close(t[:, need].double(), want[:, need], atol=1e-5, rtol=1e-5)
        assert t[:, ~need].isnan().all()  # nothing written past each pair's rows
    torch.testing.assert_close(t_kernel[:, need], t_twin[:, need], atol=1e-5, rtol=1e-5)


def test_segment_tiles_and_wide_rank_blocks_write_the_same_t():
    """Tiles of 64 pairs (segment shape) and rank blocks of 32 cover the same entries as the defaults."""
    ds = make_deltas()
    slots = load_slots(ds, max_rank=24)
    rp = RowPacks.build(row_mix("skewed", 40, len(ds)), "cpu")
    x, _ = batch(40, torch.float32, 3)
    pools, cols, width = slots.pool_columns()
    want, need = shrink_reference(x, ds, pools, cols, rp, 1, 128)
    t = torch.full((1, rp.num_pairs, width), float("nan"))
    in_launches(shrink, slots, x, t, rp, 128, block_m=64, block_r=32)
    torch.testing.assert_close(t[:, need].double(), want[:, need], atol=1e-5, rtol=1e-5)
    assert t[:, ~need].isnan().all()
