"""Paged attention for decode (and any flat list of query tokens): K/V read where they lie in the paged cache.

Semantics, for query token i of sequence b = seq_index[i] at position p = positions[i]
(decode: one token per sequence, p = context_lens[b] - 1):

    keys j in [lo, hi), hi = min(p + 1, context_lens[b]), lo = max(0, p + 1 - window) (0 without a window)
    cell(j) = block_tables[b, j // page_size] * page_size + j % page_size
    out[i, h] = softmax_j(scale · q[i, h] · k_cache[cell(j), h // G]) @ v_cache[cell(j), h // G],  G = H / KVH

A cell is one token's place in the paged cache (page × page_size + offset).
Only those cells are read: block-table entries past a sequence's pages, cells past its
length in a partly filled page and pages of other sequences may hold anything (stale
K/V, NaN), and never reach the output. A query with no key (p >= context_lens[b] + ...
cannot happen in the engine) gives zeros.

Triton (`paged_attention_triton`): one program per (query token, KV head, split of the
context); the G query heads sharing a KV head ride in one tile, so each K/V row is read
once per token. It walks its split's keys in blocks of BLOCK_N, gathering each key's page
from the block table, with an online softmax in float32 (exp2, scale folded in). Splits
(flash-decoding) keep an H100 busy when few tokens decode over a long context; a second
small kernel merges the splits' (max, sum, unnormalised output). The torch twin
(`paged_attention_torch`) computes the same from a gathered dense copy: the oracle under
the interpreter and the CPU path.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "torch", "triton")
BLOCK_N = 64  # keys per step: 64 × 128 bf16 K and V tiles are 16 KB each
MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256  # a split shorter than this costs more to merge than it saves
MAX_HEAD_DIM = 256
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(NEG_BIG - NEG_BIG) is 1, not NaN


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, seq_ptr, pos_ptr,
    out_ptr, part_ptr, max_ptr, sum_ptr,
    num_heads, head_dim, page_size, window, keys_per_split, num_splits, qk_scale,
    stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_on, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
):
    tok = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(seq_ptr + tok).to(tl.int64)
    p = tl.load(pos_ptr + tok)
    ctx = tl.load(ctx_ptr + b)
    hi = tl.minimum(p + 1, ctx)
    if WINDOW:
        lo = tl.maximum(p + 1 - window, 0)
    else:
        lo = 0
    # this split's share of [lo, hi); keys_per_split is a multiple of BLOCK_N, so blocks stay aligned
    lo = tl.maximum(lo, split * keys_per_split)
    hi = tl.minimum(hi, (split + 1) * keys_per_split)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < head_dim
    heads = kvh * GROUP + g  # the query heads that share this KV head
    q = tl.load(q_ptr + tok.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (G, D)
    if FP32:
        q = q.to(tl.float32)  # at once: bf16 arithmetic is wrong in the interpreter

    m_i = tl.full((BLOCK_G,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for j0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = (j >= lo) & (j < hi)
        # masked: table entries past the sequence's pages are never dereferenced
        page = tl.load(table_ptr + b * stride_tb + j // page_size, mask=valid, other=0).to(tl.int64)
        cell = page * page_size + j % page_size
        kv_mask = valid[:, None] & d_mask[None, :]
        # other=0 for cells outside [lo, hi): their stale values, NaN included, never enter a product
        k = tl.load(k_ptr + cell[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cell[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (G, N)
        else:
            s = tl.dot(q, tl.trans(k))  # bf16/fp16 operands, float32 accumulation
        s = tl.where(valid[None, :], s * qk_scale, NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        pr = tl.where(valid[None, :], pr, 0.0)
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new

    gd_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # unnormalised partial output and its (max, sum), merged by _merge_splits_kernel
        row = (tok.to(tl.int64) * num_heads + heads) * num_splits + split  # (G,)
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=gd_mask)
        tl.store(max_ptr + row, m_i, mask=g_mask)
        tl.store(sum_ptr + row, l_i, mask=g_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key at all: zeros
        tl.store(out_ptr + tok.to(tl.int64) * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit
def _merge_splits_kernel(part_ptr, max_ptr, sum_ptr, out_ptr, num_heads, head_dim, num_splits,
                         stride_on, stride_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[tok, h] = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s over the splits of one (token, head)."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = sp < num_splits
    row = (tok.to(tl.int64) * num_heads + h) * num_splits + sp
    m = tl.load(max_ptr + row, mask=s_mask, other=NEG_BIG)
    l = tl.load(sum_ptr + row, mask=s_mask, other=0.0)
    w = tl.where(s_mask, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    parts = tl.load(part_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(w * l, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_on + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, page_size: int, scale: float, sliding_window: int | None = None,
                    seq_index: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Semantics: the module docstring's. backend "auto" = Triton on CUDA, the torch twin elsewhere;
    "torch" / "triton" force one (Triton on CPU tensors needs TRITON_INTERPRET=1). Arguments as in
    `paged_attention_triton`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    fn = paged_attention_triton if backend == "triton" else paged_attention_torch
    return fn(q, k_cache, v_cache, block_tables, context_lens, page_size, scale, sliding_window, seq_index, positions)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, page_size: int, scale: float,
                           sliding_window: int | None = None, seq_index: torch.Tensor | None = None,
                           positions: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Semantics: the module docstring's.
    q: (N, H, D) query tokens; k_cache, v_cache: (cells, KVH, D), cells = pages × page_size, same dtype as q;
    block_tables: (B, P) int page ids per sequence (entries past a sequence's pages: anything);
    context_lens: (B,) int tokens cached per sequence (this step's K/V already written);
    seq_index: (N,) int sequence of each token (default: token i is sequence i, N == B);
    positions: (N,) int position of each token (default: context_lens[seq_index] - 1, i.e. decode);
    sliding_window: keys j > p - window only (None: all); splits: context splits (None = pick).
    Returns (N, H, D) in q's dtype."""
    seq_index, positions = _check(q, k_cache, v_cache, block_tables, context_lens, page_size, sliding_window,
                                  seq_index, positions)
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    if n == 0:
        return out
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    max_keys = block_tables.shape[1] * page_size  # an upper bound known without reading context_lens
    if splits is None:
        splits = _pick_splits(n * kv_heads, max_keys, q.device, interp)
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max_keys, keys_per_split)
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))
    fp32 = interp or q.dtype == torch.float32
    if splits > 1:
        part = torch.empty(n * heads * splits, block_d, dtype=torch.float32, device=q.device)
        stats = torch.empty(2, n * heads * splits, dtype=torch.float32, device=q.device)
        part_max, part_sum = stats[0], stats[1]
    else:
        part = part_max = part_sum = out  # not read when there is one split
    _paged_attention_kernel[(n, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, seq_index, positions,
        out, part, part_max, part_sum,
        heads, dim, page_size, sliding_window or 0, keys_per_split, splits, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        WINDOW=sliding_window is not None, SPLIT=splits > 1, FP32=fp32,
    )
    if splits > 1:
        _merge_splits_kernel[(n, heads)](part, part_max, part_sum, out, heads, dim, splits,
                                         out.stride(0), out.stride(1),
                                         BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, page_size: int, scale: float,
                          sliding_window: int | None = None, seq_index: torch.Tensor | None = None,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of `paged_attention_triton` (same arguments and result): gathers every token's
    keys into a dense (N, P × page_size, KVH, D) copy, zeroes those outside its range, and runs
    a masked float32 softmax."""
    seq_index, positions = _check(q, k_cache, v_cache, block_tables, context_lens, page_size, sliding_window,
                                  seq_index, positions)
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    seq, pos = seq_index.long(), positions.long()
    j = torch.arange(block_tables.shape[1] * page_size, device=q.device)  # (K,)
    hi = torch.minimum(pos + 1, context_lens.long()[seq])
    lo = (pos + 1 - sliding_window).clamp(min=0) if sliding_window else torch.zeros_like(pos)
    valid = (j >= lo[:, None]) & (j < hi[:, None])  # (N, K)
    cells = block_tables.long()[seq][:, j // page_size] * page_size + j % page_size
    cells = torch.where(valid, cells, 0)  # entries outside the range may name no page at all
    outside = ~valid[:, :, None, None]
    keys = k_cache[cells].float().masked_fill(outside, 0)  # (N, K, KVH, D); 0 × NaN would be NaN
    values = v_cache[cells].float().masked_fill(outside, 0)
    qg = q.float().view(n, kv_heads, heads // kv_heads, dim)  # (N, KVH, G, D)
    scores = torch.einsum("nhgd,nkhd->nhgk", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key: zeros
    out = torch.einsum("nhgk,nkhd->nhgd", probs, values)
    return out.reshape(n, heads, dim).to(q.dtype)


def _check(q, k_cache, v_cache, block_tables, context_lens, page_size, sliding_window, seq_index, positions):
    """Shapes and dtypes as documented; returns (seq_index, positions) with their defaults filled in."""
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                         "expected q (N, H, D) and caches of one shape (cells, KVH, D).")
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of {dim} but the caches {kv_heads} of {k_cache.shape[2]}; "
                         "expected the same head size and a multiple of the KV heads.")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head size {dim} is not supported; expected 1..{MAX_HEAD_DIM}.")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}, {v_cache.dtype}) must share one float dtype.")
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("q and the caches need contiguous head dimensions (stride 1 on the last axis).")
    if block_tables.dim() != 2 or context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)}: "
                         "expected (B, P) and (B,).")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables needs contiguous rows.")
    if not isinstance(page_size, int) or page_size < 1 or k_cache.shape[0] % page_size:
        raise ValueError(f"page_size={page_size!r}; expected a positive integer dividing the {k_cache.shape[0]} "
                         "cache cells.")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window!r}; expected a positive integer or None.")
    if seq_index is None:
        if n != block_tables.shape[0]:
            raise ValueError(f"{n} query tokens but {block_tables.shape[0]} sequences: pass seq_index "
                             "(one token per sequence is the default).")
        seq_index = torch.arange(n, device=q.device)
    if positions is None:
        positions = context_lens[seq_index] - 1
    if seq_index.shape != (n,) or positions.shape != (n,):
        raise ValueError(f"seq_index {tuple(seq_index.shape)} and positions {tuple(positions.shape)}: "
                         f"expected ({n},), one per query token.")
    tensors = (k_cache, v_cache, block_tables, context_lens, seq_index, positions)
    if any(t.device != q.device for t in tensors):
        raise ValueError("q, the caches, block_tables, context_lens, seq_index and positions must share one device.")
    return seq_index, positions


def _pick_splits(programs: int, max_keys: int, device: torch.device, interp: bool) -> int:
    """Split the context until there are about two programs per SM (one split under the interpreter)."""
    if interp or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(MAX_SPLITS, max_keys // MIN_KEYS_PER_SPLIT, triton.cdiv(2 * sms, programs)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
