"""Rotary position embeddings (rotate-half form, as Llama/Mistral/Qwen/Gemma/Phi-3 checkpoints expect)."""
from __future__ import annotations

import math

import torch

from skillpack_server.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, layer_type: str = "full_attention") -> torch.Tensor:
    """float32 (rotary_dim // 2,) inverse frequencies of the layers of `layer_type`, with their
    rope scaling applied."""
    dim = cfg.rotary_dim
    scaling = cfg.rope_of(layer_type)
    theta = float(scaling.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":  # the short factors: sequences stay within the original length (config.py)
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def rope_attention_scaling(cfg: ModelConfig, layer_type: str = "full_attention") -> float:
    """The factor cos and sin are multiplied by (longrope's attention factor; 1 otherwise)."""
    return float(cfg.rope_of(layer_type).get("attention_factor", 1.0))


def _llama3_scale(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept,
    the band between interpolated smoothly."""
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos, sin of shape (N, rotary_dim) for token positions (N,), times `scale`; computed in float32."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (N, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, rd)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of x (N, heads, head_dim) by per-token angles
    cos/sin (N, rotary_dim); the rest of each head passes through (partial rotary)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
