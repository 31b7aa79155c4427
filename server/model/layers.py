"""The decoder-only transformer (gpt-fast style), with per-row pack deltas on every layer.

Module and parameter names follow the Hugging Face checkpoints (`model.layers.0.
self_attn.q_proj.weight`, ...) so a checkpoint loads as is and a pack's tensor names
find their modules. Each layer computes the base result once for all rows of the step,
then adds the deltas of the packs each row uses; a step whose rows use no pack
(`packs is None`) runs the plain base model.

One set of modules serves every supported architecture, switched by the config
(`skillpack_server.model.config`): Phi-3's fused `qkv_proj` / `gate_up_proj` are single
`DeltaLinear`s whose pack delta is added to the fused output before it is split (the
delta of a fused weight is one module, docs/FORMAT.md); Qwen3 / Gemma 3 norm each q and
k head; Gemma's norms scale by `1 + w` and also sit after attention and around the MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skillpack_kernels.lowrank_ops import add_lowrank, add_lowrank_many
from skillpack_server.model.attention import paged_attention
from skillpack_server.model.batch import StepPacks, StepBatch
from skillpack_server.model.config import ModelConfig
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.rope import apply_rope, rope_attention_scaling, rope_cos_sin, rope_inv_freq
from skillpack_server.model.vocab_delta import VocabDelta


class DeltaLinear(nn.Module):
    """y = x Wᵀ + b for all rows, then each row's low-rank ΔW and bias deltas."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lowrank = None  # skillpack_kernels.lowrank_slots.LowRankSlots, attached by PackSlots
        self.lowrank_loaded: set[int] = set()
        self.bias_delta: torch.Tensor | None = None  # (num_slots, out) float32
        self.bias_loaded: set[int] = set()

    def forward(self, x: torch.Tensor, packs: StepPacks | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if packs is None:
            return y
        if not self.lowrank_loaded.isdisjoint(packs.active_slots):
            add_lowrank(y, x, self.lowrank, packs.row_packs_for(self.lowrank_loaded))
        self._add_bias_delta(y, packs)
        return y

    @staticmethod
    def together(linears: tuple["DeltaLinear", ...], x: torch.Tensor, packs: StepPacks | None) -> list[torch.Tensor]:
        """Each linear's forward on the same x (a layer's q, k and v; gate and up): their low-rank
        deltas in one kernel call where the step allows (`add_lowrank_many`)."""
        ys = [F.linear(x, lin.weight, lin.bias) for lin in linears]
        if packs is None:
            return ys
        groups: dict[int, tuple] = {}  # linears whose packs hold a delta for the same slots share a call
        for y, lin in zip(ys, linears):
            if not lin.lowrank_loaded.isdisjoint(packs.active_slots):
                rows = packs.row_packs_for(lin.lowrank_loaded)
                _, group_ys, slots = groups.setdefault(id(rows), (rows, [], []))
                group_ys.append(y)
                slots.append(lin.lowrank)
        for rows, group_ys, slots in groups.values():
            add_lowrank_many(group_ys, x, slots, rows)
        for y, lin in zip(ys, linears):
            lin._add_bias_delta(y, packs)
        return ys

    def _add_bias_delta(self, y: torch.Tensor, packs: StepPacks) -> None:
        if not self.bias_loaded.isdisjoint(packs.active_slots):
            y += (packs.mix @ self.bias_delta).to(y.dtype)


class DeltaRMSNorm(nn.Module):
    """RMSNorm whose weight gets each row's exact norm delta; scales by `offset + w`
    (Gemma's norms: offset 1). x is (N, dim), or (N, heads, dim) for a per-head q/k norm."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.delta: torch.Tensor | None = None  # (num_slots, dim) float32
        self.loaded: set[int] = set()

    def forward(self, x: torch.Tensor, packs: StepPacks | None, rows: torch.Tensor | None = None):
        """`rows`: which of the step's rows x holds (None = all of them)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if packs is None or not self.loaded & packs.active_slots:
            if self.offset:  # Gemma scales in fp32 and casts after
                return (h * (self.offset + self.weight.float())).to(x.dtype)
            return self.weight * h.to(x.dtype)  # Llama casts back before the weight, as its HF reference does
        mix = packs.mix if rows is None else packs.mix[rows]
        weight = self.offset + self.weight.float() + mix @ self.delta  # (N, dim)
        if x.dim() == 3:
            weight = weight[:, None, :]  # a token's weight serves all its heads
        if not self.offset:
            h = h.to(x.dtype).float()
        return (weight * h).to(x.dtype)


class DeltaEmbedding(nn.Module):
    """Token embedding plus each row's embedding delta (rows of ΔE gathered per token),
    times `scale` when the model scales its embeddings (Gemma: √hidden_size)."""

    def __init__(self, vocab_size: int, dim: int, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)
        self.scale = scale
        self.vocab_deltas: dict[int, VocabDelta] = {}  # slot -> ΔE (vocab, dim), sparse or low-rank

    def forward(self, ids: torch.Tensor, packs: StepPacks | None) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        if packs is not None:
            for slot in packs.active_slots & self.vocab_deltas.keys():
                rows, weights = packs.rows_of(slot)
                delta_rows = self.vocab_deltas[slot].gather(ids[rows])  # (n, dim)
                x.index_add_(0, rows, (delta_rows * weights[:, None]).to(x.dtype))
        if self.scale is not None:
            # the float32 √dim rounded to the weight's dtype, as transformers' Gemma does (bf16: √2304 stays 48)
            x = x * torch.tensor(self.scale, dtype=torch.float32).to(x.dtype)
        return x


def project_to_vocab(
    h: torch.Tensor, weight: torch.Tensor, vocab_deltas: dict[int, VocabDelta],
    packs: StepPacks | None, rows: torch.Tensor,
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
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        hd = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.layer_type = cfg.layer_types[layer]
        self.sliding_window = cfg.layer_window(layer)
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.fused, self.qk_norm = cfg.fused_qkv, cfg.qk_norm
        if cfg.fused_qkv:
            self.qkv_proj = DeltaLinear(cfg.hidden_size, q_out + 2 * kv_out, cfg.qkv_bias)  # rows [q; k; v]
        else:
            self.q_proj = DeltaLinear(cfg.hidden_size, q_out, cfg.qkv_bias)
            self.k_proj = DeltaLinear(cfg.hidden_size, kv_out, cfg.qkv_bias)
            self.v_proj = DeltaLinear(cfg.hidden_size, kv_out, cfg.qkv_bias)
        self.o_proj = DeltaLinear(q_out, cfg.hidden_size, cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = DeltaRMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = DeltaRMSNorm(hd, cfg.rms_norm_eps, cfg.norm_offset)

    def qkv(self, x: torch.Tensor, packs: StepPacks | None):
        """q (N, H, D), k and v (N, KVH, D) of the step's tokens, q/k normed per head where the model does."""
        n, hd = x.shape[0], self.head_dim
        if self.fused:
            q, k, v = self.qkv_proj(x, packs).split(
                [self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        else:
            q, k, v = DeltaLinear.together((self.q_proj, self.k_proj, self.v_proj), x, packs)
        q, k, v = q.view(n, self.num_heads, hd), k.view(n, self.num_kv_heads, hd), v.view(n, self.num_kv_heads, hd)
        if self.qk_norm:
            q, k = self.q_norm(q, packs), self.k_norm(k, packs)
        return q, k, v

    def forward(self, x, cos, sin, batch: StepBatch, k_cache, v_cache, page_size: int):
        n = x.shape[0]
        packs = batch.packs
        q, k, v = self.qkv(x, packs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, page_size, self.scale, self.sliding_window,
                              self.softcap)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim), packs)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fused = cfg.fused_gate_up
        if cfg.fused_gate_up:
            self.gate_up_proj = DeltaLinear(h, 2 * i, cfg.mlp_bias)  # rows [gate; up]
        else:
            self.gate_proj = DeltaLinear(h, i, cfg.mlp_bias)
            self.up_proj = DeltaLinear(h, i, cfg.mlp_bias)
        self.down_proj = DeltaLinear(i, h, cfg.mlp_bias)

    def forward(self, x, packs):
        if self.fused:
            gate, up = self.gate_up_proj(x, packs).chunk(2, dim=-1)
        else:
            gate, up = DeltaLinear.together((self.gate_proj, self.up_proj), x, packs)
        return self.down_proj(self.act(gate) * up, packs)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        # Llama: the norm before the MLP; Gemma: the norm of the attention's output
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, cos, sin, batch: StepBatch, k_cache, v_cache, page_size: int):
        packs = batch.packs
        h = self.self_attn(self.input_layernorm(x, packs), cos, sin, batch, k_cache, v_cache, page_size)
        if not self.sandwich:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x, packs), packs)
        x = x + self.post_attention_layernorm(h, packs)
        h = self.mlp(self.pre_feedforward_layernorm(x, packs), packs)
        return x + self.post_feedforward_layernorm(h, packs)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = DeltaEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.hidden_size, cfg.vocab_size)
        self.inv_freqs: dict[str, torch.Tensor] = {}  # layer type -> its rope frequencies, set after loading
        self.rope_scales = {t: rope_attention_scaling(cfg, t) for t in set(cfg.layer_types)}
        self.num_pack_slots = 0  # set by skillpack_server.model.pack_slots.PackSlots

    def setup_rope(self, device) -> None:
        self.inv_freqs = {t: rope_inv_freq(self.config, t).to(device) for t in sorted(set(self.config.layer_types))}

    @property
    def output(self) -> DeltaEmbedding | LMHead:
        """The module whose weight and deltas project to the vocabulary."""
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    @torch.inference_mode()
    def final_hidden(self, batch: StepBatch, kv: PagedKVCache, rows: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden states (M, dim) of the step's token rows `rows`, after writing its K/V."""
        packs = batch.packs
        x = self.model.embed_tokens(batch.token_ids, packs)  # (N, dim)
        ropes = {t: rope_cos_sin(f, batch.positions, x.dtype, self.rope_scales[t]) for t, f in self.inv_freqs.items()}
        for i, layer in enumerate(self.model.layers):
            cos, sin = ropes[layer.self_attn.layer_type]
            x = layer(x, cos, sin, batch, kv.k[i], kv.v[i], kv.page_size)
        return self.model.norm(x[rows], packs, rows)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: PagedKVCache) -> torch.Tensor:
        """float32 logits (M, vocab) for the step's `logits_rows`, after writing its K/V."""
        rows = batch.logits_rows
        h = self.final_hidden(batch, kv, rows)
        out = self.output
        logits = project_to_vocab(h, out.weight, out.vocab_deltas, batch.packs, rows)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
