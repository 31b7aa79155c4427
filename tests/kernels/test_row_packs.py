"""RowPacks against a direct reading of each row's (slot, weight) list."""
import pytest
import torch

from skillpack_kernels.row_packs import RowPacks


def test_pairs_sorted_by_slot_with_segments_and_rows_with_packs():
    rp = RowPacks.build([[(2, 1.0)], [], [(0, 0.5)], [(2, 2.0)], [(0, 1.0), (1, 0.25)]], "cpu")
    assert not rp.empty and rp.num_rows == 5 and rp.num_passes == 2
    pairs = list(zip(rp.pair_row.tolist(), rp.pair_slot.tolist(), rp.pair_weight.tolist()))
    # pass 0 holds each row's first pack, pass 1 the second; each sorted by (slot, row)
    assert pairs == [(2, 0, 0.5), (4, 0, 1.0), (0, 2, 1.0), (3, 2, 2.0), (4, 1, 0.25)]
    assert (rp.seg_slot, rp.seg_start, rp.seg_count, rp.seg_pass) == ([0, 2, 1], [0, 2, 4], [2, 2, 1], [0, 0, 1])
    assert rp.rows_with_packs.tolist() == [0, 2, 3, 4] and rp.num_rows_with_packs == 4
    assert rp.slots_used == {0, 1, 2}


def test_tiles_cut_segments_and_group_by_pass():
    rows = [[(0, 1.0)] for _ in range(5)] + [[(1, 1.0), (0, 1.0)]]
    rp = RowPacks.build(rows, "cpu")
    tiles = rp.tiles(2)
    assert list(zip(tiles.start.tolist(), tiles.count.tolist(), tiles.slot.tolist())) == [
        (0, 2, 0), (2, 2, 0), (4, 1, 0), (5, 1, 1), (6, 1, 0)]
    assert tiles.pass_ranges == [(0, 4), (4, 5)]
    assert rp.tiles(2) is tiles


def test_empty_and_duplicate_slots_merge():
    assert RowPacks.build([[], []], "cpu").empty
    assert RowPacks.build([], "cpu").empty
    rp = RowPacks.build([[(3, 0.5), (3, 0.25)]], "cpu")
    assert rp.num_pairs == 1 and rp.pair_weight.tolist() == [0.75]


@pytest.mark.parametrize("rows,match", [
    ([[(-1, 1.0)]], "slot -1"),
    ([[(0, float("nan"))]], "not a finite"),
    ([[(0,)]], "not a .slot, weight. pair"),
    ([[("a", 1.0)]], "integer slot"),
])
def test_bad_entries_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        RowPacks.build(rows, "cpu")


def test_weights_are_float32_on_device():
    rp = RowPacks.build([[(0, 1)]], torch.device("cpu"))
    assert rp.pair_weight.dtype == torch.float32 and rp.pair_row.dtype == torch.int32
