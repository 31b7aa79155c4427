"""The Llama-family transformer (gpt-fast style), with per-row pack deltas on every layer.

Module and parameter names follow the Hugging Face checkpoints (`model.layers.0.
self_attn.q_proj.weight`, ...) so a checkpoint loads as is and a pack's tensor names
find their modules. Each layer computes the base result once for all rows of the step,
then adds the deltas of the packs each row uses; a step whose rows use no pack
(`packs is None`) runs the plain base model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skillpack_kernels.lowrank_ops import add_lowrank
from skillpack_server.model.attention import paged_attention
from skillpack_server.model.batch import PackRouting, StepBatch
from skillpack_server.model.config import ModelConfig
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from skillpack_server.model.vocab_delta import VocabDelta


class DeltaLinear(nn.Module):
    """y = x Wᵀ + b for all rows, then each row's low-rank ΔW and bias deltas."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lowrank = None  # skillpack_kernels.lowrank_ops.LowRankSlots, attached by PackSlots
        self.lowrank_loaded: set[int] = set()
        self.bias_delta: torch.Tensor | None = None  # (num_slots, out) float32
        self.bias_loaded: set[int] = set()

    def forward(self, x: torch.Tensor, packs: PackRouting | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if packs is None:
            return y
        if self.lowrank_loaded & packs.active_slots:
            add_lowrank(y, x, self.lowrank, packs.routing_for(self.lowrank_loaded))
        if self.bias_loaded & packs.active_slots:
            y += (packs.mix @ self.bias_delta).to(y.dtype)
        return y


class DeltaRMSNorm(nn.Module):
    """RMSNorm whose weight gets each row's exact norm delta."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.delta: torch.Tensor | None = None  # (num_slots, dim) float32
        self.loaded: set[int] = set()

    def forward(self, x: torch.Tensor, packs: PackRouting | None, rows: torch.Tensor | None = None):
        """`rows`: which of the step's rows x holds (None = all of them)."""
        # normalise in fp32 and cast back before the weight, as the HF reference does
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if packs is None or not self.loaded & packs.active_slots:
            return self.weight * h
        mix = packs.mix if rows is None else packs.mix[rows]
        weight = self.weight.float() + mix @ self.delta  # (N, dim)
        return (weight * h.float()).to(x.dtype)


class DeltaEmbedding(nn.Module):
    """Token embedding plus each row's embedding delta (rows of ΔE gathered per token)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.vocab_deltas: dict[int, VocabDelta] = {}  # slot -> ΔE (vocab, dim), sparse or low-rank

    def forward(self, ids: torch.Tensor, packs: PackRouting | None) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        if packs is None:
            return x
        for slot in packs.active_slots & self.vocab_deltas.keys():
            rows, weights = packs.rows_of(slot)
            delta_rows = self.vocab_deltas[slot].gather(ids[rows])  # (n, dim)
            x.index_add_(0, rows, (delta_rows * weights[:, None]).to(x.dtype))
        return x


def project_to_vocab(
    h: torch.Tensor, weight: torch.Tensor, vocab_deltas: dict[int, VocabDelta],
    packs: PackRouting | None, rows: torch.Tensor,
) -> torch.Tensor:
    """float32 logits (M, vocab) of hidden rows h (M, dim): h Wᵀ plus each row's ΔW (sparse or low-rank)."""
    logits = F.linear(h, weight).float()
    if packs is None:
        return logits
    for slot in packs.active_slots & vocab_deltas.keys():
        sub, weights = packs.rows_of(slot, rows)
        if sub.numel():
            delta = vocab_deltas[slot].times_transposed(h[sub])  # (n, vocab)
            logits.index_add_(0, sub, delta * weights[:, None])
    return logits


class LMHead(nn.Module):
    """The untied output projection; its deltas are applied by `project_to_vocab`."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.vocab_deltas: dict[int, VocabDelta] = {}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.scale = hd ** -0.5
        self.sliding_window = cfg.sliding_window
        self.q_proj = DeltaLinear(cfg.hidden_size, cfg.num_heads * hd, cfg.qkv_bias)
        self.k_proj = DeltaLinear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.v_proj = DeltaLinear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.o_proj = DeltaLinear(cfg.num_heads * hd, cfg.hidden_size, cfg.o_bias)

    def forward(self, x, cos, sin, batch: StepBatch, k_cache, v_cache, page_size: int):
        n = x.shape[0]
        packs = batch.packs
        q = self.q_proj(x, packs).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x, packs).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, packs).view(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, page_size, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim), packs)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = DeltaLinear(h, i, cfg.mlp_bias)
        self.up_proj = DeltaLinear(h, i, cfg.mlp_bias)
        self.down_proj = DeltaLinear(i, h, cfg.mlp_bias)

    def forward(self, x, packs):
        return self.down_proj(F.silu(self.gate_proj(x, packs)) * self.up_proj(x, packs), packs)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, batch: StepBatch, k_cache, v_cache, page_size: int):
        packs = batch.packs
        x = x + self.self_attn(self.input_layernorm(x, packs), cos, sin, batch, k_cache, v_cache, page_size)
        return x + self.mlp(self.post_attention_layernorm(x, packs), packs)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = DeltaEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.hidden_size, cfg.vocab_size)
        self.inv_freq: torch.Tensor | None = None  # set after loading, on the model's device
        self.num_pack_slots = 0  # set by skillpack_server.model.pack_slots.PackSlots

    def setup_rope(self, device) -> None:
        self.inv_freq = rope_inv_freq(self.config).to(device)

    @property
    def output(self) -> DeltaEmbedding | LMHead:
        """The module whose weight and deltas project to the vocabulary."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        """float32 logits (M, vocab) for the step's `logits_rows`, after writing its K/V."""
        packs = batch.packs
        x = self.model.embed_tokens(batch.token_ids, packs)  # (N, dim)
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, kv.k[i], kv.v[i], kv.page_size)
        rows = batch.logits_rows
        h = self.model.norm(x[rows], packs, rows)
        out = self.output
        return project_to_vocab(h, out.weight, out.vocab_deltas, packs, rows)
