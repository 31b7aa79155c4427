"""A random-weight Llama checkpoint at Llama-3-8B dimensions, for `bench/serve.py --gpu`.

Written tensor by tensor (bounded memory) with the streaming safetensors writer; the
weights are seeded normal values scaled like an initialised model, which is all a
throughput benchmark needs. Norms are ones, so activations stay in range.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from skillpacks.checkpoint import write_safetensors

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)


def write_random_llama(folder: Path, num_layers: int = 32, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + model.safetensors for a random Llama-3-8B-shaped model; reuse it if present."""
    if (folder / "model.safetensors").exists():
        return folder
    if not 1 <= num_layers <= 128:
        raise ValueError(f"num_layers={num_layers}; expected 1..128.")
    folder.mkdir(parents=True, exist_ok=True)
    c = LLAMA3_8B
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "lm_head.weight": (c["vocab_size"], h),
              "model.norm.weight": (h,)}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}

    def tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        g = torch.Generator().manual_seed(sorted(shapes).index(name))
        return (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(dtype)

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": num_layers,
              "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": 128000, "eos_token_id": 128001, "dtype": str(dtype).removeprefix("torch."), **c}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # the weights last: their presence is what marks the folder complete
    write_safetensors(folder / "model.safetensors", {n: (dtype, s) for n, s in shapes.items()}, tensor,
                      {"format": "pt"})
    return folder
