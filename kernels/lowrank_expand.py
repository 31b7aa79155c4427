"""Expand kernels: y[row] += w * (t * s_p) @ deq(B_p)ᵀ, Bᵀ dequantized inside the tile loads.

Both shapes first add up the shrink's split-K partial sums of t, then accumulate in
float32 and add into y once per program:
- decode: one program per (routed row, output block) walks all of the row's pairs, so a
  fused row (several packs) is summed in registers and written once, in one launch;
- segment: one program per (tile of up to BLOCK_M pairs sharing a slot, output block),
  a tl.dot per rank block; launched once per pass (RowPacks) so no two programs of a
  launch write the same row.
"""
import torch
import triton
import triton.language as tl

from kernels.dequant_tile import dequant_tile, dot_acc


@triton.jit
def _expand_decode_kernel(
    y_ptr, t_ptr, routed_rows_ptr, row_pair_ptr, row_pairs_ptr, pair_slot_ptr, pair_weight_ptr,
    rank_ptr, s_ptr, meta_ptr, codes_ptr, scales_ptr, zeros_ptr,
    out_features, max_rank, num_pairs, num_splits,
    stride_y, code_stride, scale_stride,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    u = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    row = tl.load(routed_rows_ptr + u).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for q in range(tl.load(row_pair_ptr + u), tl.load(row_pair_ptr + u + 1)):
        pair = tl.load(row_pairs_ptr + q)
        slot = tl.load(pair_slot_ptr + pair)
        weight = tl.load(pair_weight_ptr + pair)
        rank = tl.load(rank_ptr + slot)
        codes = codes_ptr + slot.to(tl.int64) * code_stride
        scales = scales_ptr + slot.to(tl.int64) * scale_stride
        zeros = zeros_ptr + slot.to(tl.int64) * scale_stride
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < rank
            tv = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for sp in range(0, num_splits):
                tv += tl.load(t_ptr + (sp * num_pairs + pair) * max_rank + r, mask=r_mask, other=0.0)
            tv = tv * tl.load(s_ptr + slot * max_rank + r, mask=r_mask, other=0.0) * weight
            meta = meta_ptr + (slot * max_rank + r) * 4
            code_off = tl.load(meta, mask=r_mask, other=0)
            scale_off = tl.load(meta + 1, mask=r_mask, other=0)
            bits = tl.load(meta + 2, mask=r_mask, other=8)
            lg = tl.load(meta + 3, mask=r_mask, other=3)
            b = dequant_tile(codes, scales, zeros, code_off[:, None], scale_off[:, None], bits[:, None],
                             lg[:, None], n[None, :], r_mask[:, None] & n_mask[None, :])  # (R, N)
            acc += tl.sum(tv[:, None] * b, axis=0)
    y = y_ptr + row * stride_y + n
    # load y and convert at once: bf16 arithmetic is wrong in the interpreter; the store rounds back
    tl.store(y, tl.load(y, mask=n_mask, other=0.0).to(tl.float32) + acc, mask=n_mask)


@triton.jit
def _expand_segment_kernel(
    y_ptr, t_ptr, pair_row_ptr, pair_weight_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
    rank_ptr, s_ptr, meta_ptr, codes_ptr, scales_ptr, zeros_ptr,
    first_tile, out_features, max_rank, num_pairs, num_splits,
    stride_y, code_stride, scale_stride,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr,
):
    tile = first_tile + tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    slot = tl.load(tile_slot_ptr + tile)
    rank = tl.load(rank_ptr + slot)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < count
    rows = tl.load(pair_row_ptr + start + m, mask=m_mask, other=0).to(tl.int64)
    weight = tl.load(pair_weight_ptr + start + m, mask=m_mask, other=0.0)
    codes = codes_ptr + slot.to(tl.int64) * code_stride
    scales = scales_ptr + slot.to(tl.int64) * scale_stride
    zeros = zeros_ptr + slot.to(tl.int64) * scale_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        mr_mask = m_mask[:, None] & r_mask[None, :]
        tt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in range(0, num_splits):
            tt += tl.load(t_ptr + (sp * num_pairs + start + m[:, None]) * max_rank + r[None, :], mask=mr_mask, other=0.0)
        tt = tt * tl.load(s_ptr + slot * max_rank + r, mask=r_mask, other=0.0)[None, :]
        meta = meta_ptr + (slot * max_rank + r) * 4
        code_off = tl.load(meta, mask=r_mask, other=0)
        scale_off = tl.load(meta + 1, mask=r_mask, other=0)
        bits = tl.load(meta + 2, mask=r_mask, other=8)
        lg = tl.load(meta + 3, mask=r_mask, other=3)
        b = dequant_tile(codes, scales, zeros, code_off[:, None], scale_off[:, None], bits[:, None],
                         lg[:, None], n[None, :], r_mask[:, None] & n_mask[None, :])  # (R, N)
        acc = dot_acc(tt, b, acc, LOWP)
    acc = acc * weight[:, None]
    y = y_ptr + rows[:, None] * stride_y + n[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y, tl.load(y, mask=mn_mask, other=0.0).to(tl.float32) + acc, mask=mn_mask)


def expand_decode(y: torch.Tensor, t: torch.Tensor, slots, routing, block_r: int, block_n: int) -> None:
    """Semantics: for each routed row i: y[i] += Σ_{pairs j of row i} w_j * ((Σ_sp t[sp, j, :r_p]) * s_p) @ deq(B_p).T
    y: (rows, out) float, rows without a pack untouched; t: float32 (splits, pairs, max_rank);
    slots: LowRankSlots; routing: RowPacks; block_r, block_n: powers of two."""
    _check_t(t, routing, slots)
    grid = (routing.num_routed_rows, triton.cdiv(y.shape[1], block_n))
    _expand_decode_kernel[grid](
        y, t, routing.routed_rows, routing.row_pair_ptr, routing.row_pairs, routing.pair_slot, routing.pair_weight,
        slots.rank, slots.s, slots.b.meta, slots.b.codes, slots.b.scales, slots.b.zeros,
        y.shape[1], slots.max_rank, routing.num_pairs, t.shape[0],
        y.stride(0), slots.b.codes.stride(0), slots.b.scales.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )


def expand_segment(y: torch.Tensor, t: torch.Tensor, slots, routing, block_m: int, block_r: int, block_n: int,
                   lowp: int) -> None:
    """Semantics: as `expand_decode`, per tile of up to block_m pairs sharing a slot, one launch per pass.
    y: (rows, out) float; t: float32 (splits, pairs, max_rank); block_m, block_r, block_n: powers
    of two >= 16 (tl.dot); lowp: 0 fp32 products, 1 fp16, 2 bf16 tensor-core operands."""
    _check_t(t, routing, slots)
    tiles = routing.tiles(block_m)
    for first, end in tiles.pass_ranges:
        grid = (end - first, triton.cdiv(y.shape[1], block_n))
        _expand_segment_kernel[grid](
            y, t, routing.pair_row, routing.pair_weight, tiles.start, tiles.count, tiles.slot,
            slots.rank, slots.s, slots.b.meta, slots.b.codes, slots.b.scales, slots.b.zeros,
            first, y.shape[1], slots.max_rank, routing.num_pairs, t.shape[0],
            y.stride(0), slots.b.codes.stride(0), slots.b.scales.stride(0),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, LOWP=lowp,
        )


def _check_t(t: torch.Tensor, routing, slots) -> None:
    want = (routing.num_pairs, slots.max_rank)
    assert t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape[1:]) == want, \
        f"t must be contiguous float32 (splits, {want[0]}, {want[1]}), got {t.dtype} {tuple(t.shape)}"
