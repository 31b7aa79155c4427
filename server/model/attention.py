"""Attention over the paged KV cache for a step mixing prefill chunks and decode tokens.

Semantics, for new token i of sequence b at position p (window w, softcap c, GQA group of h):

    keys j of b with  max(0, p - w + 1) <= j <= p
    out[i, h] = softmax_j(cap(q[i, h] · K[b, j, h // G] · scale)) @ V[b, j, h // G],  cap(s) = c·tanh(s / c)

Each sequence reads only the pages it fills (and, under a window, only the window's), so a
step costs what its tokens attend to, never a copy padded to the longest sequence. The cache
is laid out head-major (`kv_cache.head_major_cache`) and a request's pages are one run when
the allocator finds one, so a sequence's keys are usually a view of the cache, read in place. On CUDA
(without soft-capping) decode rows go to the Triton kernel that reads K/V pages in place
(`skillpack_kernels.paged_attention`); prefill chunks run per sequence through SDPA (flash when
the chunk starts the sequence). On the CPU, decode rows are one grouped matmul per sequence,
on one thread while the rows are short (`ONE_THREAD_FMAS`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from skillpack_kernels.lowrank_compact import one_thread
from skillpack_server.model.batch import SeqSpan, StepBatch

# decode rows through the Triton kernel: "auto" = on CUDA; tests set "triton" to run it interpreted
DECODE_KERNEL = "auto"
# CPU decode rows whose longest one needs fewer multiply-adds than this (q·K and p·V) run on one
# thread: SmolLM2's 9 heads of 64 up to 1,820 tokens (the compact kernels use the same bound)
ONE_THREAD_FMAS = 2 << 20


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    batch: StepBatch, page_size: int, scale: float, sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write the step's new K/V into the cache, then attend each token to its sequence's
    cached prefix (causal, optionally windowed; each layer passes its own window).
    `softcap` (Gemma 2): scores become softcap · tanh(scores / softcap) before the mask.

    q (N, H, D), k/v (N, KVH, D) for the step's N new tokens; caches (cells, KVH, D).
    Returns (N, H, D).
    """
    k_cache[batch.cell_mapping] = k
    v_cache[batch.cell_mapping] = v
    out = torch.empty_like(q)
    decode = [s for s in batch.spans if s.rows == 1]
    prefill = [s for s in batch.spans if s.rows > 1]
    kernel = q.is_cuda if DECODE_KERNEL == "auto" else DECODE_KERNEL == "triton"
    if decode and kernel and softcap is None:
        _decode_in_place(q, k_cache, v_cache, batch, page_size, scale, sliding_window, out)
    else:
        # one grouped matmul per sequence over its keys where they lie: gathering every row's
        # pages into one padded batch copies K and V once more per layer, and measured 2-6x
        # slower from 4 rows x 1536 tokens to 16 rows x 160; only many very short rows
        # (32 x 64 tokens) gained from it (15 %), not worth a second path. Rows of short contexts
        # run on one thread: each op is small (one row's keys), and where torch has more OpenMP
        # threads than free cores a second thread took tens of microseconds to wake for every op,
        # more than the op itself (8 rows of 16 + 32 tokens: base decode 59.5 -> 66.3 tok/s);
        # longer ones keep torch's threads (many cores: a long row's ops are worth splitting)
        heads, dim = q.shape[1], q.shape[2]
        longest = max((s.context_len for s in decode), default=0)
        small = not q.is_cuda and longest * heads * dim * 2 < ONE_THREAD_FMAS
        with one_thread() if small else contextlib.nullcontext():
            for span in decode:
                out[span.first] = _attend(q[span.first : span.first + 1], k_cache, v_cache, span, page_size, scale,
                                          sliding_window, softcap)[0]
    for span in prefill:
        out[span.first : span.first + span.rows] = _attend(q[span.first : span.first + span.rows], k_cache, v_cache,
                                                           span, page_size, scale, sliding_window, softcap)
    return out


def _window_start(span: SeqSpan, window: int | None) -> int:
    """The first key any of the span's queries attends to."""
    return 0 if window is None else max(0, span.start - window + 1)


def _heads(cache: torch.Tensor) -> torch.Tensor:
    """The (KVH, cells, D) tensor behind a (cells, KVH, D) cache view."""
    phys = cache.permute(1, 0, 2)
    if not phys.is_contiguous():
        raise ValueError("the KV cache must be laid out head-major (skillpack_server.model.kv_cache.head_major_cache).")
    return phys


def _read(cache: torch.Tensor, span: SeqSpan, page_size: int, lo: int, hi: int) -> torch.Tensor:
    """Keys (or values) lo..hi-1 of a sequence, (KVH, hi - lo, D): a view of the cache when its
    pages are one run, else gathered page by page."""
    phys = _heads(cache)
    first = lo // page_size
    if span.first_page is not None:
        base = span.first_page * page_size
        return phys[:, base + lo : base + hi]
    blocks = phys.view(phys.shape[0], -1, page_size, phys.shape[2]).index_select(
        1, span.pages[first : -(-hi // page_size)])
    return blocks.reshape(phys.shape[0], -1, phys.shape[2])[:, lo - first * page_size : hi - first * page_size]


def _visible(span: SeqSpan, lo: int, hi: int, window: int | None, device) -> torch.Tensor:
    """(T, L) bool: which of keys lo..hi-1 each of the span's queries sees."""
    key_pos = torch.arange(lo, hi, device=device)
    q_pos = torch.arange(span.start, hi, device=device)[:, None]
    visible = key_pos <= q_pos
    if window is not None:
        visible &= key_pos > q_pos - window
    return visible


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: SeqSpan, page_size: int,
            scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """One sequence's new tokens q (T, H, D) over its cached keys; (T, H, D)."""
    t, heads, dim = q.shape
    lo, hi = _window_start(span, window), span.context_len
    keys = _read(k_cache, span, page_size, lo, hi)  # (KVH, L, D)
    values = _read(v_cache, span, page_size, lo, hi)
    kv_heads = keys.shape[0]
    if t > 1 and softcap is None:
        # a chunk that starts the sequence, with no window cutting into it, is plain causal: SDPA's
        # fused (flash) path; otherwise an explicit (T, L) mask
        plain_causal = span.start == 0 and (window is None or window >= t)
        mask = None if plain_causal else _visible(span, lo, hi, window, q.device)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=plain_causal, scale=scale, enable_gqa=heads != kv_heads)
        return out[0].transpose(0, 1)
    # grouped matmul: every query head of a KV head at once, K and V read as they lie
    qg = q.permute(1, 0, 2).reshape(kv_heads, heads // kv_heads * t, dim)  # (KVH, G*T, D)
    scores = _capped(torch.bmm(qg, keys.transpose(1, 2)) * scale, softcap)  # (KVH, G*T, L)
    if t > 1:
        scores = scores.masked_fill(~_visible(span, lo, hi, window, q.device).repeat(heads // kv_heads, 1),
                                    float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    out = torch.bmm(probs, values)  # (KVH, G*T, D)
    return out.view(heads, t, dim).transpose(0, 1)


def _decode_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                     page_size: int, scale: float, window: int | None, out: torch.Tensor) -> None:
    """Decode rows through the Triton kernel that reads each page where it lies."""
    from skillpack_kernels.paged_attention import paged_attention_triton  # Triton: only where this path runs

    rows = torch.tensor([s.first for s in batch.spans if s.rows == 1], device=q.device)
    out[rows] = paged_attention_triton(q[rows], k_cache, v_cache, batch.block_tables, batch.context_lens,
                                       page_size, scale, window, seq_index=batch.seq_index[rows],
                                       positions=batch.positions[rows])
