"""The Triton helpers both low-rank kernels inline, against what they stand for in torch (interpreter on CPU)."""
import pytest
import torch
import triton
import triton.language as tl

from skillpack_kernels.dequant_tile import tile_pairs, unpack_words
from skillpack_kernels.quant import pack_codes
from skillpack_kernels.row_packs import RowPacks


@triton.jit
def _unpack_kernel(words_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    WORDS: tl.constexpr = COLS * BITS // 32
    r = tl.arange(0, ROWS)
    w = tl.arange(0, WORDS)
    c = tl.arange(0, COLS)
    q = unpack_words(tl.load(words_ptr + r[:, None] * WORDS + w[None, :]), ROWS, COLS, BITS)
    tl.store(out_ptr + r[:, None] * COLS + c[None, :], q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_words_reads_the_packed_layout(bits):
    """The bytes of kernels/quant.py, seen as little-endian int32 words, unpack to the codes packed,
    the top code included (its word is negative: an arithmetic shift drags the sign bit in)."""
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (16, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    q[0, -1] = (1 << bits) - 1
    words = pack_codes(q, bits).view(torch.int32)  # (16, 64 * bits / 32)
    assert (words < 0).any()
    out = torch.empty(16, 64)
    _unpack_kernel[(1,)](words, out, ROWS=16, COLS=64, BITS=bits)
    assert torch.equal(out, q.float())


@triton.jit
def _tile_kernel(pair_row_ptr, start_ptr, count_ptr, slot_ptr, out_ptr, BLOCK_M: tl.constexpr):
    tile = tl.program_id(0)
    slot, start, m, m_mask, rows = tile_pairs(tile, pair_row_ptr, start_ptr, count_ptr, slot_ptr, BLOCK_M)
    out = out_ptr + tile * (BLOCK_M + 2)
    tl.store(out, slot)
    tl.store(out + 1, start)
    tl.store(out + 2 + m, tl.where(m_mask, rows, -1))


def test_tile_pairs_reads_each_tile_of_row_packs():
    rp = RowPacks.build([[(3, 1.0)] for _ in range(19)] + [[], [(1, 0.5), (3, 1.0)]], "cpu")
    tiles = rp.tiles(16)
    out = torch.empty(tiles.start.numel(), 18, dtype=torch.int64)
    _tile_kernel[(tiles.start.numel(),)](rp.pair_row, tiles.start, tiles.count, tiles.slot, out, BLOCK_M=16)
    for k, (start, count, slot) in enumerate(zip(tiles.start.tolist(), tiles.count.tolist(), tiles.slot.tolist())):
        rows = rp.pair_row[start : start + count].tolist()
        assert out[k].tolist() == [slot, start] + rows + [-1] * (16 - count)
