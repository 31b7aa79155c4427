"""Shrink kernels: t = x @ deq(A_p)ᵀ per (row, slot) pair, A dequantized inside the tile loads.

Two launch shapes over the same output layout t float32 (splits, pairs, max_rank),
whose split-K partial sums the expand kernels add up:
- decode: one program per (pair, rank block, K split), a GEMV against its slot's A;
- segment: one program per (tile of up to BLOCK_M pairs sharing a slot, rank block,
  K split), a tl.dot so each dequantized A tile serves BLOCK_M rows.
"""
import torch
import triton
import triton.language as tl

from kernels.dequant_tile import dequant_tile, dot_acc


@triton.jit
def _shrink_decode_kernel(
    x_ptr, t_ptr, pair_row_ptr, pair_slot_ptr, rank_ptr, meta_ptr, codes_ptr, scales_ptr, zeros_ptr,
    in_features, max_rank, num_pairs, k_per_split,
    stride_x, code_stride, scale_stride,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    r_block = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(pair_slot_ptr + pair)
    rank = tl.load(rank_ptr + slot)
    # rank blocks past this slot's rank have nothing to read: the expand masks them out
    if r_block * BLOCK_R < rank:
        r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        meta = meta_ptr + (slot * max_rank + r) * 4
        code_off = tl.load(meta, mask=r_mask, other=0)
        scale_off = tl.load(meta + 1, mask=r_mask, other=0)
        bits = tl.load(meta + 2, mask=r_mask, other=8)
        lg = tl.load(meta + 3, mask=r_mask, other=3)
        codes = codes_ptr + slot.to(tl.int64) * code_stride
        scales = scales_ptr + slot.to(tl.int64) * scale_stride
        zeros = zeros_ptr + slot.to(tl.int64) * scale_stride
        row = tl.load(pair_row_ptr + pair).to(tl.int64)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k_lo = split * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, in_features), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            xv = tl.load(x_ptr + row * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
            a = dequant_tile(codes, scales, zeros, code_off[:, None], scale_off[:, None], bits[:, None],
                             lg[:, None], k[None, :], r_mask[:, None] & k_mask[None, :])  # (R, K)
            acc += tl.sum(a * xv[None, :], axis=1)
        tl.store(t_ptr + (split * num_pairs + pair) * max_rank + r, acc, mask=r_mask)


@triton.jit
def _shrink_segment_kernel(
    x_ptr, t_ptr, pair_row_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
    rank_ptr, meta_ptr, codes_ptr, scales_ptr, zeros_ptr,
    in_features, max_rank, num_pairs, k_per_split,
    stride_x, code_stride, scale_stride,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, LOWP: tl.constexpr,
):
    tile = tl.program_id(0)
    r_block = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(tile_slot_ptr + tile)
    rank = tl.load(rank_ptr + slot)
    if r_block * BLOCK_R < rank:
        start = tl.load(tile_start_ptr + tile)
        count = tl.load(tile_count_ptr + tile)
        m = tl.arange(0, BLOCK_M)
        m_mask = m < count
        rows = tl.load(pair_row_ptr + start + m, mask=m_mask, other=0).to(tl.int64)
        r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        meta = meta_ptr + (slot * max_rank + r) * 4
        code_off = tl.load(meta, mask=r_mask, other=0)
        scale_off = tl.load(meta + 1, mask=r_mask, other=0)
        bits = tl.load(meta + 2, mask=r_mask, other=8)
        lg = tl.load(meta + 3, mask=r_mask, other=3)
        codes = codes_ptr + slot.to(tl.int64) * code_stride
        scales = scales_ptr + slot.to(tl.int64) * scale_stride
        zeros = zeros_ptr + slot.to(tl.int64) * scale_stride
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_lo = split * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, in_features), BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # (M, K)
            a = dequant_tile(codes, scales, zeros, code_off[None, :], scale_off[None, :], bits[None, :],
                             lg[None, :], k[:, None], k_mask[:, None] & r_mask[None, :])  # (K, R)
            acc = dot_acc(xt, a, acc, LOWP)
        t = t_ptr + (split * num_pairs + start + m[:, None]) * max_rank + r[None, :]
        tl.store(t, acc, mask=m_mask[:, None] & r_mask[None, :])


def shrink_decode(x: torch.Tensor, t: torch.Tensor, slots, routing, block_r: int, block_k: int) -> None:
    """Semantics: t[sp, j, :r_p] = x[row_j, K_sp] @ deq(A_p)[:, K_sp].T for each pair j = (row_j, slot p),
    K_sp the sp-th of t.shape[0] equal slices of the input features (split-K partial sums).
    x: (rows, in) float; t: float32 (splits, pairs, max_rank), written for r < r_p only;
    slots: LowRankSlots; routing: RowPacks; block_r, block_k: powers of two."""
    splits, k_per_split = _split_geometry(t, x.shape[1], block_k)
    grid = (routing.num_pairs, triton.cdiv(slots.max_rank, block_r), splits)
    _shrink_decode_kernel[grid](
        x, t, routing.pair_row, routing.pair_slot, slots.rank, slots.a.meta,
        slots.a.codes, slots.a.scales, slots.a.zeros,
        x.shape[1], slots.max_rank, routing.num_pairs, k_per_split,
        x.stride(0), slots.a.codes.stride(0), slots.a.scales.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )


def shrink_segment(x: torch.Tensor, t: torch.Tensor, slots, routing, block_m: int, block_r: int, block_k: int,
                   lowp: int) -> None:
    """Semantics: as `shrink_decode`, computed per tile of up to block_m pairs that share a slot.
    x: (rows, in) float; t: float32 (splits, pairs, max_rank); block_m, block_r, block_k: powers
    of two >= 16 (tl.dot); lowp: 0 fp32 products, 1 fp16, 2 bf16 tensor-core operands."""
    splits, k_per_split = _split_geometry(t, x.shape[1], block_k)
    tiles = routing.tiles(block_m)
    grid = (tiles.start.numel(), triton.cdiv(slots.max_rank, block_r), splits)
    _shrink_segment_kernel[grid](
        x, t, routing.pair_row, tiles.start, tiles.count, tiles.slot, slots.rank, slots.a.meta,
        slots.a.codes, slots.a.scales, slots.a.zeros,
        x.shape[1], slots.max_rank, routing.num_pairs, k_per_split,
        x.stride(0), slots.a.codes.stride(0), slots.a.scales.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, LOWP=lowp,
    )


def _split_geometry(t: torch.Tensor, in_features: int, block_k: int) -> tuple[int, int]:
    """(splits, input features per split, a whole number of K blocks)."""
    assert t.dtype == torch.float32 and t.dim() == 3 and t.is_contiguous(), "t must be contiguous float32 (S, P, R)"
    splits = t.shape[0]
    k_per_split = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    assert (splits - 1) * k_per_split < in_features, f"{splits} splits leave an empty K slice"
    return splits, k_per_split
