"""Write base + pack as an ordinary dense Hugging Face checkpoint (for tools that know no packs).

Streams tensor by tensor: each base tensor is read, gets its module's dequantized
delta added in float32 (float64 for float64 bases), is checked finite, cast and written
before the next one is read. Non-weight files (config, tokenizer, chat template,
generation config) are copied. A base that ties its embeddings stays tied: the one
shared weight gets the embedding delta once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from skillpacks.checkpoint import DTYPES, TORCH_TO_ST, atomic_folder, open_checkpoint, write_safetensors
from skillpacks.errors import PackError
from skillpacks.fingerprint import base_fingerprint, check_base
from skillpacks.format import SkillPack, read_pack

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SHARD_BYTES = 4 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPE_NAMES)}.")
    return DTYPE_NAMES[dtype]


def _shards(specs: dict[str, tuple[torch.dtype, tuple]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most `max_bytes` (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name in sorted(specs):
        n = math.prod(specs[name][1]) * DTYPES[TORCH_TO_ST[specs[name][0]]][1]
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    return shards + [current] if current else shards


def merge_pack(pack_path: str | os.PathLike, base_dir: str | os.PathLike, out_dir: str | os.PathLike,
               dtype: torch.dtype | str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `out_dir` = base + the pack's delta; returns `out_dir`.

    dtype: the merged weights' dtype (None keeps each base tensor's dtype). The folder is
    assembled in a temporary sibling and renamed, so a failed merge leaves nothing.
    """
    out_dtype = parse_dtype(dtype)
    base = open_checkpoint(base_dir)
    pack = read_pack(pack_path)
    check_base(pack.manifest["base"], base_fingerprint(base))
    if base.tied_embeddings and "lm_head.weight" in pack.deltas:
        raise PackError("the base ties its input and output embeddings but the pack has its own lm_head delta; "
                        "a tied checkpoint cannot hold it (merge into an untied copy of the base).")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty; expected a new or empty folder.")
    specs = {}
    for name in base.names():
        dt = base.dtype(name)
        specs[name] = (out_dtype if out_dtype is not None and dt.is_floating_point else dt, base.shape(name))
    with atomic_folder(out) as tmp:
        _write_weights(tmp, base, pack, specs, max_shard_bytes)
        _copy_side_files(Path(base_dir), tmp, out_dtype)
    return out


def merged_tensor(name: str, base_tensor: torch.Tensor, pack: SkillPack, out_dtype: torch.dtype) -> torch.Tensor:
    """One base tensor plus its delta (if the pack has one), checked finite, in `out_dtype`."""
    delta = pack.deltas.get(name)
    if delta is None:
        return base_tensor.to(out_dtype)
    if not base_tensor.is_floating_point():
        raise PackError(f"the pack has a delta for '{name}', which is a {base_tensor.dtype} tensor in the base; "
                        "expected a floating-point weight.")
    work = torch.float64 if base_tensor.dtype == torch.float64 else torch.float32
    merged = base_tensor.to(work) + delta.dense(work).view(base_tensor.shape)
    if not torch.isfinite(merged).all():
        raise PackError(f"merging the pack into '{name}' gives non-finite values.")
    return merged.to(out_dtype)


def _write_weights(folder: Path, base, pack: SkillPack, specs: dict, max_shard_bytes: int) -> None:
    shards = _shards(specs, max_shard_bytes)
    produce = lambda n: merged_tensor(n, base.get(n), pack, specs[n][0])  # noqa: E731
    metadata = {"format": "pt", "skillpack_merged": pack.manifest["name"]}
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", specs, produce, metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, {n: specs[n] for n in names}, produce, metadata)
        weight_map |= {n: fname for n in names}
    total = sum(math.prod(s) * DTYPES[TORCH_TO_ST[d]][1] for d, s in specs.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_side_files(src: Path, dst: Path, out_dtype: torch.dtype | None) -> None:
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name == "model.safetensors.index.json":
            continue
        shutil.copy2(f, dst / f.name)
    if out_dtype is not None:
        cfg_path = dst / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(out_dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
