"""The runtime's model configuration, read from a Hugging Face `config.json`.

Only the Llama family is served: Llama (incl. SmolLM2, tied embeddings), Mistral and
Qwen2 (q/k/v biases). Anything else is refused here, where the checkpoint enters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# architecture name in config.json -> (model_type, whether q/k/v always carry a bias)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MAX_CONFIG_BYTES = 1 << 20


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
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # rope_type + its parameters
    sliding_window: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; expected grouped-query attention."
            )

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; the engine serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        _, always_qkv_bias = SUPPORTED_ARCHITECTURES[arch]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu' (SwiGLU MLP).")
        # transformers v5 keeps rope_theta inside rope_parameters; v4 configs keep it on top
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}."
            )
        rope["rope_type"] = rope_type
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        elif arch == "Qwen2ForCausalLM" and sliding is not None:
            raise ValueError("Qwen2 with use_sliding_window=true is not supported; expected full attention.")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=always_qkv_bias or bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)) and not always_qkv_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_theta=rope_theta,
            rope_scaling=rope,
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=[int(e) for e in eos_ids],
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
