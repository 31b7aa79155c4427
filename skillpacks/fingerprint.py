"""The base-model fingerprint a pack records, and the check that a base matches it.

`weights_sha256` is SHA-256 over every tensor of the base checkpoint in sorted name
order; for each tensor it takes one line of JSON `[name, dtype, shape]` + "\\n" (dtype
as safetensors names it, e.g. "BF16"), then the tensor's stored bytes. The bytes are
streamed from disk in bounded chunks, so hashing never holds a whole tensor.
"""
from __future__ import annotations

import hashlib
import json

from skillpacks.checkpoint import Checkpoint
from skillpacks.errors import PackError

CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)


def weights_sha256(ckpt: Checkpoint) -> str:
    digest = hashlib.sha256()
    for name in ckpt.names():
        entry = ckpt.entry(name)
        digest.update(json.dumps([name, entry.dtype, list(entry.shape)]).encode() + b"\n")
        for block in ckpt.raw_bytes(name):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(ckpt: Checkpoint) -> dict:
    """What identifies a base: architecture, key config sizes, tensor shapes, weight hash."""
    cfg = ckpt.config
    architectures = cfg.get("architectures") or [None]
    config = {key: cfg.get(key) for key in CONFIG_KEYS}
    config["tie_word_embeddings"] = ckpt.tied_embeddings
    if config["num_key_value_heads"] is None:  # older configs: no GQA means kv heads = heads
        config["num_key_value_heads"] = cfg.get("num_attention_heads")
    return {
        "architecture": architectures[0],
        "model_type": cfg.get("model_type"),
        "config": config,
        "tensors": {name: list(ckpt.shape(name)) for name in ckpt.names()},
        "weights_sha256": weights_sha256(ckpt),
    }


def check_base(manifest_base: dict, fp: dict) -> None:
    """Raise PackError naming the first way `fp` (a base) differs from the pack's base."""
    for key in ("architecture", "model_type"):
        if manifest_base.get(key) != fp.get(key):
            raise PackError(f"the pack was built for {key} {manifest_base.get(key)!r} but the base is "
                            f"{fp.get(key)!r}.")
    want_cfg, have_cfg = manifest_base.get("config") or {}, fp.get("config") or {}
    for key in sorted(set(want_cfg) | set(have_cfg)):
        if want_cfg.get(key) != have_cfg.get(key):
            raise PackError(f"the pack was built for a base with {key}={want_cfg.get(key)!r} but this base "
                            f"has {key}={have_cfg.get(key)!r}.")
    want, have = manifest_base.get("tensors") or {}, fp.get("tensors") or {}
    for name in sorted(want):
        if name not in have:
            raise PackError(f"the pack's base has tensor '{name}' but this base does not.")
        if list(want[name]) != list(have[name]):
            raise PackError(f"tensor '{name}' has shape {list(have[name])} in this base but "
                            f"{list(want[name])} in the pack's base.")
    extra = sorted(set(have) - set(want))
    if extra:
        raise PackError(f"this base has tensor '{extra[0]}' that the pack's base does not "
                        f"({len(extra)} such tensors).")
    if manifest_base.get("weights_sha256") != fp.get("weights_sha256"):
        raise PackError("the base's architecture and shapes match but its weights differ: weights_sha256 is "
                        f"{fp.get('weights_sha256')} here, {manifest_base.get('weights_sha256')} in the pack.")
