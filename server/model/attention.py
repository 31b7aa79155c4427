"""Attention over the paged KV cache for a step mixing prefill chunks and decode tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skillpack_server.model.batch import StepBatch


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    batch: StepBatch, page_size: int, scale: float, sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write the step's new K/V into the cache, then attend each token to its sequence's
    cached prefix (causal, optionally windowed; each layer passes its own window).
    `softcap` (Gemma 2): scores become softcap · tanh(scores / softcap) before the mask.

    q (N, H, D), k/v (N, KVH, D) for the step's N new tokens; caches (slots, KVH, D).
    Returns (N, H, D).
    """
    k_cache[batch.slot_mapping] = k
    v_cache[batch.slot_mapping] = v
    num_seqs, num_pages = batch.block_tables.shape
    offsets = torch.arange(page_size, device=q.device)
    ctx_slots = (batch.block_tables[:, :, None] * page_size + offsets).view(num_seqs, num_pages * page_size)
    key_pos = torch.arange(num_pages * page_size, device=q.device)
    # slots past a sequence's length hold stale or other requests' K/V, possibly non-finite;
    # a masked score still meets its key and value (NaN + -inf, 0 * NaN are NaN): zero them
    outside = (key_pos >= batch.context_lens[:, None])[:, None, :, None]  # (B, 1, K, 1)
    keys = k_cache[ctx_slots].transpose(1, 2).masked_fill(outside, 0)  # (B, KVH, K, D)
    values = v_cache[ctx_slots].transpose(1, 2).masked_fill(outside, 0)
    max_q = batch.query_pos.shape[1]
    q_pad = q.new_zeros(num_seqs, max_q, q.shape[1], q.shape[2])
    q_pad[batch.seq_index, batch.query_offset] = q
    q_pos = batch.query_pos[:, :, None]  # (B, Tq, 1)
    # padded query rows sit at position 0 and so still see key 0: no all-masked (NaN) rows
    mask = (key_pos <= q_pos) & (key_pos < batch.context_lens[:, None, None])  # (B, Tq, K)
    if sliding_window is not None:
        mask &= key_pos > q_pos - sliding_window
    if softcap is None:
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # (B, H, Tq, D)
    else:
        # SDPA cannot cap scores, so Gemma 2's layers take this eager path (softmax in float32, as transformers)
        groups = q.shape[1] // k.shape[1]
        scores = q_pad.transpose(1, 2) @ keys.repeat_interleave(groups, 1).transpose(2, 3) * scale  # (B, H, Tq, K)
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values.repeat_interleave(groups, 1)
    return out.transpose(1, 2)[batch.seq_index, batch.query_offset]
