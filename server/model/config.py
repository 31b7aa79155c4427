"""The runtime's model configuration, read from a Hugging Face `config.json`.

Served: Llama (incl. SmolLM2, tied embeddings), Mistral (sliding window), Qwen2 (q/k/v
biases), Qwen3 (per-head q/k RMSNorm), Gemma 2 and Gemma 3 text (scaled embeddings,
`1 + w` RMSNorms around attention and MLP, logit soft-capping, alternating sliding-window
layers, Gemma 3's own rope for those) and Phi-3 (fused `qkv_proj` / `gate_up_proj`,
partial rotary, longrope up to its original context). The config is read by transformers' own config class
(`skillpacks.architectures.transformers_config`), so every layer's window and rope are
those of the transformers model; anything else is refused here, where the checkpoint
enters, with one line listing what is supported.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from skillpacks.architectures import (
    SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, UnsupportedModelError, rope_parameters_by_layer_type,
    transformers_config,
)

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_TYPES", "UnsupportedModelError"]

MAX_CONFIG_BYTES = 1 << 20
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # layer type ("full_attention" / "sliding_attention") -> rope_type, rope_theta and its parameters
    rope: dict[str, dict] = field(default_factory=lambda: {"full_attention": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0}})
    layer_types: list[str] = field(default_factory=list)  # one per layer; empty = all full attention
    sliding_window: int | None = None  # the window of "sliding_attention" layers
    eos_token_ids: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    rotary_dim: int | None = None  # leading dims of each head that rotate (Phi-3 partial rotary); None = all
    attn_scale: float | None = None  # None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: scores = cap · tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2/3: logits = cap · tanh(logits / cap)
    embed_scale: float | None = None  # Gemma: embeddings times √hidden_size
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w)
    sandwich_norms: bool = False  # Gemma: norms after attention and around the MLP too
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each q and k head
    fused_qkv: bool = False  # Phi-3: one qkv_proj, rows [q; k; v]
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, rows [gate; up]

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; expected grouped-query attention."
            )
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers; expected num_hidden_layers="
                             f"{self.num_layers}.")
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.attn_scale is None:
            self.attn_scale = self.head_dim ** -0.5
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden activation {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}.")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def rope_of(self, layer_type: str) -> dict:
        """The rope parameters the layers of `layer_type` rotate with."""
        return self.rope.get(layer_type) or next(iter(self.rope.values()))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        hf = transformers_config(cfg)  # refuses an unsupported architecture or rope type, in one line
        arch = cfg["architectures"][0]
        gemma = arch in GEMMA
        if gemma and getattr(hf, "use_bidirectional_attention", False):
            raise ValueError(f"{arch} with use_bidirectional_attention=true is not supported; expected causal "
                             "attention.")
        hidden, heads = int(hf.hidden_size), int(hf.num_attention_heads)
        head_dim = int(getattr(hf, "head_dim", None) or hidden // heads)
        ropes = rope_parameters_by_layer_type(hf)
        for params in ropes.values():
            params.setdefault("rope_type", "default")
        rotary = {int(head_dim * float(p.get("partial_rotary_factor", 1.0))) for p in ropes.values()}
        if len(rotary) != 1 or min(rotary) % 2:
            raise ValueError(f"rotary dimensions {sorted(rotary)} differ between layer types or are odd; expected "
                             "one even number of rotating dims per head.")
        # longrope (Phi-3.5, Phi-4-mini) switches to its long factors once a sequence passes the
        # original length, re-rotating every earlier key; a paged cache cannot, so it is served up to there
        limit = int(hf.max_position_embeddings)
        for params in ropes.values():
            if params["rope_type"] == "longrope":
                original = int(params["original_max_position_embeddings"])
                factor = float(params.get("factor") or limit / original)
                params.setdefault("attention_factor", math.sqrt(1 + math.log(factor) / math.log(original))
                                  if factor > 1 else 1.0)
                limit = min(limit, original)
        # Mistral and Phi-3 have no layer types: their window, if any, is on every layer
        layer_types = list(getattr(hf, "layer_types", None) or [])
        window = getattr(hf, "sliding_window", None)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        always_qkv_bias = arch == "Qwen2ForCausalLM"
        eos = cfg.get("eos_token_id")  # as written: a config class's default id is no stop token of this model
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            architecture=arch,
            vocab_size=int(hf.vocab_size),
            hidden_size=hidden,
            intermediate_size=int(hf.intermediate_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=limit,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=always_qkv_bias or (attention_bias and arch != "Phi3ForCausalLM"),
            o_bias=attention_bias and not always_qkv_bias and arch != "Phi3ForCausalLM",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)) and arch == "LlamaForCausalLM",
            rope=ropes,
            layer_types=layer_types if window else [],
            sliding_window=int(window) if window else None,
            eos_token_ids=[int(e) for e in eos_ids],
            hidden_act=hf.hidden_activation if gemma else hf.hidden_act,
            rotary_dim=rotary.pop(),
            attn_scale=float(hf.query_pre_attn_scalar) ** -0.5 if gemma else None,
            # transformers' Gemma 3 attention never passes its attn_logit_softcapping on: neither do we
            attn_softcap=getattr(hf, "attn_logit_softcapping", None) if arch == "Gemma2ForCausalLM" else None,
            final_softcap=getattr(hf, "final_logit_softcapping", None),
            embed_scale=hidden ** 0.5 if gemma else None,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            fused_qkv=arch == "Phi3ForCausalLM",
            fused_gate_up=arch == "Phi3ForCausalLM",
        )

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "ModelConfig":
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{ckpt_dir} has no config.json; expected a Hugging Face checkpoint folder.")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is {path.stat().st_size} bytes; expected a config under 1 MiB.")
        cfg = cls.from_dict(json.loads(path.read_text()))
        gen = Path(ckpt_dir) / "generation_config.json"
        if gen.is_file() and gen.stat().st_size <= MAX_CONFIG_BYTES:
            eos = json.loads(gen.read_text()).get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else list(eos or [])
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | {int(e) for e in extra})
        return cfg
