"""Expand kernel: y[row] += w · (t ⊙ s_p) @ deq(B_p)ᵀ, Bᵀ dequantized inside the tile loads,
and its torch twin `expand_torch` (same arguments, same y).

One program per (tile of up to BLOCK_M pairs sharing a slot, BLOCK_N output columns). It
walks the slot's singular vectors pool by pool (up to three pools per launch, bits and
group size compile-time constants), adds up the shrink's split-K partial sums of t in
one wide load, and accumulates in float32; y is read and written once. A launch covers
one pass of the pairs (RowPacks), so no two of its programs write the same row.

Zeros fold as in the shrink: Σ_r c_r (q_rn s_r + z_r) = Σ_r (c_r s_r) q_rn + Σ_r c_r z_r
when BLOCK_N lies inside one group, so the codes enter the dot as exact integers.
"""
import torch
import triton
import triton.language as tl

from skillpack_kernels.dequant_tile import dot_acc, tile_pairs, unpack_words
from skillpack_kernels.quant import dequantize_groupwise


@triton.jit
def _expand_pool(acc, t_ptr, start, m, m_mask, slot, n0, n, n_mask, num_pairs, num_splits, t_width, t_col,
                 rank_ptr, s_ptr, codes_ptr, scales_ptr, zeros_ptr, cap, words, groups,
                 BITS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    """acc (M, N) + this pool's share of the tile's delta for output columns n."""
    rank = tl.load(rank_ptr + slot)
    sp = tl.arange(0, BLOCK_S)
    PER_WORD: tl.constexpr = 32 // BITS
    WN: tl.constexpr = BLOCK_N // PER_WORD
    w = tl.program_id(1) * WN + tl.arange(0, WN)  # n0 // PER_WORD, visibly aligned
    w_mask = w < words
    t_rows = (sp[:, None] * num_pairs + start + m[None, :]).to(tl.int64) * t_width + t_col  # (S, M)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        vec = slot.to(tl.int64) * cap + r
        mr_mask = m_mask[:, None] & r_mask[None, :]
        tt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):  # BLOCK_S splits per wide load
            parts = tl.load(t_ptr + s0 * num_pairs * t_width + t_rows[:, :, None] + r[None, None, :],
                            mask=(s0 + sp < num_splits)[:, None, None] & mr_mask[None, :, :], other=0.0)
            tt += tl.sum(parts, axis=0)
        c = tt * tl.load(s_ptr + vec, mask=r_mask, other=0.0)[None, :]  # (M, R)
        wt = tl.load(codes_ptr + vec[:, None] * words + w[None, :], mask=r_mask[:, None] & w_mask[None, :], other=0)
        q = unpack_words(wt, BLOCK_R, BLOCK_N, BITS)  # (R, N)
        if G >= BLOCK_N:
            grp = vec * groups + n0 // G  # the whole column block is inside one group
            sc = tl.load(scales_ptr + grp, mask=r_mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + grp, mask=r_mask, other=0.0).to(tl.float32)
            acc = dot_acc(c * sc[None, :], q, acc, PREC)
            acc += tl.sum(c * z[None, :], axis=1)[:, None]
        else:
            grp = vec[:, None] * groups + (n // G)[None, :]
            rn_mask = r_mask[:, None] & n_mask[None, :]
            sc = tl.load(scales_ptr + grp, mask=rn_mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + grp, mask=rn_mask, other=0.0).to(tl.float32)
            acc = dot_acc(c, q * sc + z, acc, PREC)
    return acc


@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, pair_row_ptr, pair_weight_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
    first_tile, out_features, stride_y, num_pairs, num_splits, t_width,
    rank0, s0, codes0, scales0, zeros0, cap0, words0, groups0, tcol0,
    rank1, s1, codes1, scales1, zeros1, cap1, words1, groups1, tcol1,
    rank2, s2, codes2, scales2, zeros2, cap2, words2, groups2, tcol2,
    BITS0: tl.constexpr, G0: tl.constexpr, BITS1: tl.constexpr, G1: tl.constexpr,
    BITS2: tl.constexpr, G2: tl.constexpr, NUM_POOLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    PREC: tl.constexpr,
):
    tile = first_tile + tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    slot, start, m, m_mask, rows = tile_pairs(tile, pair_row_ptr, tile_start_ptr, tile_count_ptr, tile_slot_ptr,
                                              BLOCK_M)
    weight = tl.load(pair_weight_ptr + start + m, mask=m_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _expand_pool(acc, t_ptr, start, m, m_mask, slot, n0, n, n_mask, num_pairs, num_splits, t_width, tcol0,
                       rank0, s0, codes0, scales0, zeros0, cap0, words0, groups0,
                       BITS0, G0, BLOCK_M, BLOCK_R, BLOCK_N, BLOCK_S, PREC)
    if NUM_POOLS > 1:
        acc = _expand_pool(acc, t_ptr, start, m, m_mask, slot, n0, n, n_mask, num_pairs, num_splits, t_width,
                           tcol1, rank1, s1, codes1, scales1, zeros1, cap1, words1, groups1,
                           BITS1, G1, BLOCK_M, BLOCK_R, BLOCK_N, BLOCK_S, PREC)
    if NUM_POOLS > 2:
        acc = _expand_pool(acc, t_ptr, start, m, m_mask, slot, n0, n, n_mask, num_pairs, num_splits, t_width,
                           tcol2, rank2, s2, codes2, scales2, zeros2, cap2, words2, groups2,
                           BITS2, G2, BLOCK_M, BLOCK_R, BLOCK_N, BLOCK_S, PREC)
    y = y_ptr + rows[:, None] * stride_y + n[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    # load y and convert at once: bf16 arithmetic is wrong in the interpreter; the store rounds back
    tl.store(y, tl.load(y, mask=mn_mask, other=0.0).to(tl.float32) + acc * weight[:, None], mask=mn_mask)


def expand(y: torch.Tensor, t: torch.Tensor, pools: list, t_cols: list[int], row_packs, *,
           block_m: int = 16, block_r: int = 16, block_n: int = 16, prec: int = 0) -> None:
    """Semantics: y[row_j] += w_j · Σ_i ((Σ_sp t[sp, j, t_cols[i] : t_cols[i] + r_{p,i}]) * s_{p,i}) @ deq(B_{p,i}).T
    for each pair j = (row_j, slot p, weight w_j), pools i (up to 3), r_{p,i} the rows slot p holds in pool i;
    summed in float32 and rounded into y once per pass of the pairs.
    y: (rows, out) float, rows without a pair untouched; t: float32 (splits, pairs, t_width);
    pools: BitPool list; t_cols: first t column of each pool (LowRankSlots.pool_columns); row_packs: RowPacks.
    Tuning, not semantics: block_m (pairs a tile), block_r, block_n: powers of two >= 16;
    prec: dot operands (dequant_tile.dot_acc). One launch per pass."""
    _check(t, pools, t_cols, row_packs)
    assert len(pools) <= 3, f"one launch reads at most 3 pools, got {len(pools)}"
    tiles = row_packs.tiles(block_m)
    args, consts = [], {}
    for i in range(3):
        p, col = (pools[i], t_cols[i]) if i < len(pools) else (pools[0], 0)
        args += [p.rank, p.s, p.b.codes, p.b.scales, p.b.zeros, p.cap, p.b.words, p.b.groups, col]
        consts.update({f"BITS{i}": p.bits, f"G{i}": p.group_size})
    # partial sums per wide load: (splits, rows, ranks) stays within ~32 registers a thread
    block_s = max(1, min(1 << max(0, t.shape[0] - 1).bit_length(), 256 // block_m))
    for first, end in tiles.pass_ranges:
        grid = (end - first, triton.cdiv(y.shape[1], block_n))
        _expand_kernel[grid](
            y, t, row_packs.pair_row, row_packs.pair_weight, tiles.start, tiles.count, tiles.slot,
            first, y.shape[1], y.stride(0), row_packs.num_pairs, t.shape[0], t.shape[2], *args,
            NUM_POOLS=len(pools), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_S=block_s,
            PREC=prec, **consts,
        )


def expand_torch(y: torch.Tensor, t: torch.Tensor, pools: list, t_cols: list[int], row_packs) -> None:
    """Semantics: `expand`'s, with its arguments less the tuning ones, adding the same into y.
    The twin: per pass, each segment's float32 delta from every pool's dequantized B rows, added
    to y in float32 and rounded once, as each launch does."""
    _check(t, pools, t_cols, row_packs)
    parts = t.sum(0)  # (pairs, t_width): the splits' partial sums added up
    for pass_index in range(row_packs.num_passes):
        acc = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # (rows, out)
        rows_of_pass = []
        for slot, start, count, seg_pass in zip(row_packs.seg_slot, row_packs.seg_start, row_packs.seg_count,
                                                row_packs.seg_pass):
            if seg_pass != pass_index:
                continue
            rows = row_packs.pair_row[start : start + count].long()
            delta = torch.zeros(count, y.shape[1], dtype=torch.float32, device=y.device)
            for p, col in zip(pools, t_cols):
                n = p.rows[slot]
                if n:
                    b = dequantize_groupwise(p.b.read(slot, 0, n), torch.float32)  # (n, out): rows of Bᵀ
                    delta += (parts[start : start + count, col : col + n] * p.s[slot, :n]) @ b
            acc.index_add_(0, rows, delta * row_packs.pair_weight[start : start + count, None])
            rows_of_pass.append(rows)
        rows = torch.cat(rows_of_pass)  # each row once: a pass holds every row at most once
        y[rows] = (y[rows].float() + acc[rows]).to(y.dtype)


def _check(t: torch.Tensor, pools: list, t_cols: list[int], row_packs) -> None:
    assert pools and len(t_cols) == len(pools)
    assert t.dtype == torch.float32 and t.is_contiguous() and t.dim() == 3 and t.shape[1] == row_packs.num_pairs, \
        f"t must be contiguous float32 (splits, {row_packs.num_pairs}, width), got {t.dtype} {tuple(t.shape)}"
