"""Triton device helpers shared by the shrink and expand kernels: a tile's pairs, code-word unpacking, the dot.

Codes arrive as little-endian int32 words of the kernels/quant.py layout (column c of a
row is bits [(c % (32/bits))·bits, +bits) of word c // (32/bits)), so a tile of a
(bits)-wide pool is one wide contiguous load per row, unpacked with constant shifts.
Nothing here writes a dequantized copy anywhere. A @triton.jit function called from a kernel
is inlined into it, so sharing these costs the kernels nothing.
"""
import triton
import triton.language as tl


@triton.jit
def tile_pairs(tile, pair_row_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr, BLOCK_M: tl.constexpr):
    """Tile `tile` of `RowPacks.tiles(BLOCK_M)`: (its slot, its first pair, m = arange(BLOCK_M),
    m < its pair count, each pair's batch row as int64 (0 past the count))."""
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < count
    rows = tl.load(pair_row_ptr + start + m, mask=m_mask, other=0).to(tl.int64)
    return slot, start, m, m_mask, rows


@triton.jit
def unpack_words(words, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """(ROWS, COLS * BITS // 32) int32 words -> (ROWS, COLS) float32 codes, lowest column in the lowest bits."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    # the mask after the shift drops the sign bits an arithmetic shift of the top code drags in
    q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(q, (ROWS, COLS)).to(tl.float32)


@triton.jit
def dot_acc(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with float32 accumulation. PREC 0: fp32 products (fp32 activations, interpreter);
    1 / 2: fp16 / bf16 operands; 3: tf32 operands (float coefficients of any range)."""
    if PREC == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif PREC == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
