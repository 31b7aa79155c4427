"""`add_lowrank_many`: several linears that read the same x with the same packs (a layer's q, k and
v) in one call of the compact kernels, against the float64 dense reference and one call per linear."""
import pytest
import torch

from skillpack_kernels.lowrank_compact import DecodeGroup, available
from skillpack_kernels.lowrank_ops import add_lowrank, add_lowrank_many
from skillpack_kernels.row_packs import RowPacks
from tests.kernels.delta_cases import TOLERANCES, dense_reference, load_slots, make_delta, row_mix

pytestmark = pytest.mark.skipif(not available(), reason="the compact kernels need a C compiler")

TIER_MIXES = [[(8, 4)], [(1, 8)], [(5, 8), (6, 4), (7, 2)], [(3, 2), (9, 2)]]
IN_F, OUTS = 72, (56, 24, 100)  # q, k and v widths; 100: a last block of 4 columns


def deltas(out_f: int, seed: int):
    """A pack's delta on each of 4 slots; each linear's ranks in another order (seed), so the
    packs' columns of t start at other places in each linear's plan."""
    return [make_delta(IN_F, out_f, TIER_MIXES[(i + seed) % len(TIER_MIXES)], group_size=32 if i % 2 else 16,
                       seed=seed + i) for i in range(len(TIER_MIXES))]


@pytest.mark.parametrize("kind", ["distinct", "skewed", "base_rows", "fused"])
@pytest.mark.parametrize("rows", [1, 7, 64, 80])  # 80: more than one call takes, one linear at a time
def test_linears_in_one_call_equal_the_dense_reference_and_each_alone(kind, rows):
    ds = [deltas(o, seed=j) for j, o in enumerate(OUTS)]
    slots = [load_slots(d, cpu_form="compact") for d in ds]
    mix = row_mix(kind, rows, len(TIER_MIXES))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN_F, generator=g)
    ys = [torch.randn(rows, o, generator=g) for o in OUTS]
    y0s = [y.clone() for y in ys]
    rp = RowPacks.build(mix, "cpu")
    add_lowrank_many(ys, x, slots, rp)
    base = [i for i, p in enumerate(mix) if not p]
    atol, rtol = TOLERANCES[torch.float32]
    for y, y0, d, s in zip(ys, y0s, ds, slots):
        torch.testing.assert_close(y.double(), dense_reference(y0, x, d, mix), atol=atol, rtol=rtol)
        assert torch.equal(y[base], y0[base])
        alone = y0.clone()
        add_lowrank(alone, x, s, RowPacks.build(mix, "cpu"))
        assert torch.equal(y, alone)  # the same kernels, the same sums in the same order
    grouped = isinstance(rp.steps[tuple(slots)], DecodeGroup)
    assert grouped == (rows <= 64 and len(base) < rows)


def test_a_group_is_made_again_after_a_slot_changes_and_refuses_what_one_linear_would():
    ds = [deltas(o, seed=3 + j) for j, o in enumerate(OUTS[:2])]
    slots = [load_slots(d[:2], num_slots=4, max_rank=max(x.rank for x in d), cpu_form="compact") for d in ds]
    mix = [[(0, 1.0)], [(1, 0.5)], []]
    rp = RowPacks.build(mix, "cpu")
    x = torch.randn(3, IN_F)
    add_lowrank_many([torch.zeros(3, o) for o in OUTS[:2]], x, slots, rp)
    first = rp.steps[tuple(slots)]
    slots[1].load(3, ds[1][3])  # another slot of one linear changes between two steps
    ys = [torch.zeros(3, o) for o in OUTS[:2]]
    add_lowrank_many(ys, x, slots, rp)
    assert first.stale and rp.steps[tuple(slots)] is not first
    atol, rtol = TOLERANCES[torch.float32]
    for y, d in zip(ys, ds):
        torch.testing.assert_close(y.double(), dense_reference(torch.zeros_like(y), x, d[:2], mix), atol=atol,
                                   rtol=rtol)
    group = rp.steps[tuple(slots)]
    wide = [torch.zeros(3, 2 * OUTS[0])[:, ::2], torch.zeros(3, OUTS[1])]  # a column stride the kernels refuse
    assert not group.run(wide, x) and not group.run(ys, x.double()) and not group.run(ys, x[:2])
