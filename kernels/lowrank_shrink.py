"""Shrink kernel: t = x @ deq(A_p)ᵀ for every (row, slot) pair, A dequantized inside the tile loads,
and its torch twin `shrink_torch` (same arguments, same t).

One launch covers up to three bit pools (kernels/lowrank_slots.py `BitPool`), each with its
bits, group size and K chunk as compile-time constants. A program owns (tile of up to
BLOCK_M pairs sharing a slot, one BLOCK_R block of one pool's ranks, one K split) and
writes float32 partial sums into t (splits, pairs, t_width), pool i's ranks at columns
[t_col_i, t_col_i + cap_i); the expand kernel adds the splits up.

Zeros are folded per group: Σ_c x_c (q_c s + z) = s Σ_c x_c q_c + z Σ_c x_c, so when a
K chunk lies inside one group the tensor cores see the raw integer codes (exact in
fp16/bf16) and each group's scale and zero load once per singular vector.
"""
import torch
import triton
import triton.language as tl

from skillpack_kernels.dequant_tile import dot_acc, tile_pairs, unpack_words
from skillpack_kernels.quant import dequantize_groupwise


@triton.jit
def _shrink_pool(x_ptr, out, rows, m_mask, slot, rb, split, in_features, stride_x,
                 rank_ptr, codes_ptr, scales_ptr, zeros_ptr, cap, words, groups,
                 BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr, k_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    """t columns of rank block `rb` of one pool for one tile and K split; blocks past the slot's rows do nothing."""
    rank = tl.load(rank_ptr + slot)
    if rb * BLOCK_R < rank:
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        vec = slot.to(tl.int64) * cap + r  # pool row of each singular vector
        PER_WORD: tl.constexpr = 32 // BITS
        WC: tl.constexpr = KC // PER_WORD
        acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        # every index below is a multiple of a constant, so the compiler sees aligned, wide loads
        k_lo = split * k_blocks * 128
        for c in range(0, k_blocks * (128 // KC)):
            k0 = k_lo + c * KC
            w = split * k_blocks * (128 // PER_WORD) + c * WC + tl.arange(0, WC)
            wt = tl.load(codes_ptr + vec[:, None] * words + w[None, :],
                         mask=r_mask[:, None] & (w < words)[None, :], other=0)
            q = unpack_words(wt, BLOCK_R, KC, BITS)  # (R, KC)
            k = k0 + tl.arange(0, KC)
            k_mask = k < in_features
            xt = tl.load(x_ptr + rows[None, :] * stride_x + k[:, None],
                         mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # (KC, M)
            if PREC == 0:
                xt = xt.to(tl.float32)  # at once: bf16 arithmetic is wrong in the interpreter
            if G >= KC:
                grp = vec * groups + k0 // G  # the whole chunk is inside one group
                # a chunk past in_features (the last 128-column block half empty) has no group of
                # this row: k0 // G would name the next row's or fall past the pool, and 0 × NaN is NaN
                g_mask = r_mask & (r * 0 + k0 < in_features)  # (R,): the interpreter rejects a 0-d compare in a mask
                sc = tl.load(scales_ptr + grp, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + grp, mask=g_mask, other=0.0).to(tl.float32)
                part = dot_acc(q, xt, tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32), PREC)
                xsum = tl.sum(xt.to(tl.float32), axis=0)
                acc += sc[:, None] * part + z[:, None] * xsum[None, :]
            else:
                grp = vec[:, None] * groups + (k // G)[None, :]
                rk_mask = r_mask[:, None] & k_mask[None, :]
                sc = tl.load(scales_ptr + grp, mask=rk_mask, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + grp, mask=rk_mask, other=0.0).to(tl.float32)
                acc = dot_acc(q * sc + z, xt, acc, PREC)
        tl.store(out[None, :] + r[:, None], acc, mask=r_mask[:, None] & m_mask[None, :])


@triton.jit
def _shrink_kernel(
    x_ptr, t_ptr, pair_row_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
    in_features, stride_x, num_pairs, t_width, k_blocks,
    rank0, codes0, scales0, zeros0, cap0, words0, groups0, tcol0, blocks0,
    rank1, codes1, scales1, zeros1, cap1, words1, groups1, tcol1, blocks1,
    rank2, codes2, scales2, zeros2, cap2, words2, groups2, tcol2,
    BITS0: tl.constexpr, G0: tl.constexpr, KC0: tl.constexpr,
    BITS1: tl.constexpr, G1: tl.constexpr, KC1: tl.constexpr,
    BITS2: tl.constexpr, G2: tl.constexpr, KC2: tl.constexpr,
    NUM_POOLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    j = tl.program_id(1)  # rank block, counted across the pools in turn
    split = tl.program_id(2)
    slot, start, m, m_mask, rows = tile_pairs(tile, pair_row_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
                                              BLOCK_M)
    out = t_ptr + ((split * num_pairs + start + m).to(tl.int64) * t_width)
    if j < blocks0:
        _shrink_pool(x_ptr, out + tcol0, rows, m_mask, slot, j, split, in_features, stride_x,
                     rank0, codes0, scales0, zeros0, cap0, words0, groups0,
                     BITS0, G0, KC0, k_blocks, BLOCK_M, BLOCK_R, PREC)
    else:
        if NUM_POOLS > 1:
            if j < blocks0 + blocks1:
                _shrink_pool(x_ptr, out + tcol1, rows, m_mask, slot, j - blocks0, split, in_features, stride_x,
                             rank1, codes1, scales1, zeros1, cap1, words1, groups1,
                             BITS1, G1, KC1, k_blocks, BLOCK_M, BLOCK_R, PREC)
            else:
                if NUM_POOLS > 2:
                    _shrink_pool(x_ptr, out + tcol2, rows, m_mask, slot, j - blocks0 - blocks1, split,
                                 in_features, stride_x,
                                 rank2, codes2, scales2, zeros2, cap2, words2, groups2,
                                 BITS2, G2, KC2, k_blocks, BLOCK_M, BLOCK_R, PREC)


def k_chunk(group_size: int) -> int:
    """K columns a shrink step reads: one whole group when it is 16..128 wide (so zeros fold)."""
    return max(16, min(128, group_size))


def shrink(x: torch.Tensor, t: torch.Tensor, pools: list, t_cols: list[int], row_packs, k_split: int, *,
           block_m: int = 16, block_r: int = 16, prec: int = 0) -> None:
    """Semantics: t[sp, j, t_cols[i] + r] = x[row_j, K_sp] @ deq(A_{p,i})[r, K_sp] for each pair j = (row_j, slot p),
    each pool i (up to 3) and each r < the rows slot p holds in pool i; K_sp = [sp·k_split, (sp+1)·k_split).
    x: (rows, in) float; t: float32 (splits, pairs, t_width), other entries untouched;
    pools: BitPool list; t_cols: first t column of each pool (LowRankSlots.pool_columns);
    row_packs: RowPacks; k_split: multiple of 128.
    Tuning, not semantics: block_m (pairs a tile), block_r: powers of two >= 16;
    prec: dot operands (dequant_tile.dot_acc)."""
    _check(x, t, pools, t_cols, k_split)
    assert len(pools) <= 3, f"one launch reads at most 3 pools, got {len(pools)}"
    tiles = row_packs.tiles(block_m)
    blocks = [triton.cdiv(p.cap, block_r) for p in pools]
    args, consts = [], {}
    for i in range(3):
        p, col, nb = (pools[i], t_cols[i], blocks[i]) if i < len(pools) else (pools[0], 0, 0)
        args += [p.rank, p.a.codes, p.a.scales, p.a.zeros, p.cap, p.a.words, p.a.groups, col]
        if i < 2:
            args.append(nb)
        consts.update({f"BITS{i}": p.bits, f"G{i}": p.group_size, f"KC{i}": k_chunk(p.group_size)})
    grid = (tiles.start.numel(), sum(blocks), t.shape[0])
    _shrink_kernel[grid](
        x, t, row_packs.pair_row, tiles.start, tiles.count, tiles.slot,
        x.shape[1], x.stride(0), row_packs.num_pairs, t.shape[2], k_split // 128, *args,
        NUM_POOLS=len(pools), BLOCK_M=block_m, BLOCK_R=block_r, PREC=prec, **consts,
    )


def shrink_torch(x: torch.Tensor, t: torch.Tensor, pools: list, t_cols: list[int], row_packs, k_split: int) -> None:
    """Semantics: `shrink`'s, with its arguments less the tuning ones, writing the same entries of t.
    The twin: per segment of one slot and per pool, the slot's A rows there dequantized, then a
    float32 matmul per K split."""
    _check(x, t, pools, t_cols, k_split)
    in_f = x.shape[1]
    for slot, start, count in zip(row_packs.seg_slot, row_packs.seg_start, row_packs.seg_count):
        xs = x.index_select(0, row_packs.pair_row[start : start + count].long()).float()  # (count, in)
        for p, col in zip(pools, t_cols):
            n = p.rows[slot]
            if not n:
                continue
            a = dequantize_groupwise(p.a.read(slot, 0, n), torch.float32)  # (n, in)
            for sp in range(t.shape[0]):
                k = slice(sp * k_split, min((sp + 1) * k_split, in_f))
                t[sp, start : start + count, col : col + n] = xs[:, k] @ a[:, k].T


def _check(x: torch.Tensor, t: torch.Tensor, pools: list, t_cols: list[int], k_split: int) -> None:
    assert pools and len(t_cols) == len(pools)
    assert t.dtype == torch.float32 and t.dim() == 3 and t.is_contiguous(), "t must be contiguous float32 (S, P, W)"
    assert k_split % 128 == 0 and (t.shape[0] - 1) * k_split < x.shape[1] <= t.shape[0] * k_split, \
        f"{t.shape[0]} splits of {k_split} do not cover {x.shape[1]} input features exactly"
