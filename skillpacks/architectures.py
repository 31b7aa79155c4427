"""Which model architectures and RoPE types SkillPacks are built for and served on, checked
where a checkpoint enters (`skillpack build`, the server's start-up).

A config.json is read the way transformers reads it (`transformers_config`): its own
config class applies every backward-compatible conversion (v4 `rope_theta` /
`rope_scaling` / `rope_local_base_freq` / `sliding_window_pattern` keys, Phi-3's `su`
rope), so the runtime sees the same layer types, windows and rotary parameters as the
transformers model that tests compare it with. Refusals are one line naming the bad value
and listing what is supported.
"""
from __future__ import annotations

from transformers import CONFIG_MAPPING

# architecture in config.json -> its model_type (the transformers config class that reads it)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # longrope: up to its original length


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture or rotary embedding the engine cannot run."""


def supported_line() -> str:
    return (f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}; "
            f"RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}")


def architecture_of(raw: dict) -> str:
    """config.json's `architectures[0]`, refused unless the engine runs it."""
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported ({supported_line()}).")
    return arch


def _rope_types_written(raw: dict) -> set[str]:
    """Every rope type a raw config names, in either key and either layout (flat, or per layer type)."""
    found = set()
    for key in ("rope_parameters", "rope_scaling"):
        value = raw.get(key)
        if not isinstance(value, dict):
            continue
        for params in [value, *(v for v in value.values() if isinstance(v, dict))]:
            kind = params.get("rope_type", params.get("type"))
            if isinstance(kind, str):
                found.add(kind)
    return found


def rope_parameters_by_layer_type(hf_config) -> dict[str, dict]:
    """{layer type: rope parameters (rope_type, rope_theta, ...)} of a transformers config;
    one entry per layer type when the model has a rope per type (Gemma 3), else the one
    rope under every type its layers use."""
    params = dict(hf_config.rope_parameters or {})
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if params and all(isinstance(v, dict) for v in params.values()) and set(params) >= layer_types:
        return {t: dict(params[t]) for t in layer_types}
    return {t: dict(params) for t in layer_types}


def transformers_config(raw: dict):
    """The transformers config object for a supported config.json dict; raises
    UnsupportedModelError (one line) for an architecture or rope type the engine cannot run."""
    arch = architecture_of(raw)
    unsupported = sorted(_rope_types_written(raw) - set(SUPPORTED_ROPE_TYPES))
    if unsupported:
        raise UnsupportedModelError(f"rope_type {unsupported[0]!r} is not supported ({supported_line()}).")
    model_type = SUPPORTED_ARCHITECTURES[arch]
    if raw.get("model_type", model_type) != model_type:
        raise UnsupportedModelError(f"model_type {raw.get('model_type')!r} does not go with architecture {arch}; "
                                    f"expected {model_type!r}.")
    try:
        hf = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k != "model_type"})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"config.json of this {arch} cannot be read by transformers ({str(e)[:300]}).") from e
    for layer_type, params in rope_parameters_by_layer_type(hf).items():
        kind = params.get("rope_type", "default")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope_type {kind!r} ({layer_type} layers) is not supported "
                                        f"({supported_line()}).")
    return hf


def check_supported(raw: dict) -> None:
    """Raise UnsupportedModelError unless the engine can serve a model with this config.json."""
    transformers_config(raw)
