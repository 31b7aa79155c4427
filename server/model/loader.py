"""Load a Hugging Face safetensors checkpoint folder into the runtime's Transformer.

The model is built on the meta device (no memory, no init cost) and the checkpoint's
tensors are read one at a time (one file or the shards of `model.safetensors.index.json`),
cast to the runtime's dtype and assigned in place of its parameters, gpt-fast style: peak
memory is the model in its runtime dtype plus one tensor, never a second copy of the
model (a bf16 checkpoint served in bf16 is read as is). Only safetensors are read: a
folder with only pickled `.bin` weights is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from skillpack_server.model.config import ModelConfig
from skillpack_server.model.layers import Transformer

MAX_INDEX_BYTES = 16 << 20


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (one file, or the shards its index names)."""
    single = ckpt_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"{index} is {index.stat().st_size} bytes; expected an index under 16 MiB.")
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [ckpt_dir / s for s in shards]
        missing = [str(p) for p in paths if not p.is_file() or p.parent != ckpt_dir]
        if missing:
            raise ValueError(f"{index} names shards that are not in {ckpt_dir}: {missing}.")
        return paths
    raise ValueError(
        f"{ckpt_dir} holds no model.safetensors (or sharded index); the engine loads "
        "safetensors checkpoints only, never pickled .bin files."
    )


def load_model(ckpt_dir: str | Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """The checkpoint as a runtime Transformer on `device` in `dtype`, ready for inference."""
    ckpt_dir = Path(ckpt_dir)
    cfg = ModelConfig.from_checkpoint(ckpt_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()  # meta tensors: names and shapes only
    files = checkpoint_files(ckpt_dir)
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names |= set(f.keys())
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # tied: the output projection is the embedding
    missing, unexpected = sorted(expected.keys() - names), sorted(names - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt_dir} does not match a {cfg.architecture}: missing tensors "
            f"{missing[:5]}, unexpected tensors {unexpected[:5]}."
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(names & set(f.keys())):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"checkpoint tensor {name} has shape {shape}; the config implies "
                                     f"{tuple(expected[name].shape)}.")
                # one tensor at a time: read (memory-mapped), cast, keep only the runtime's copy
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.setup_rope(device)
    return model.eval()
