"""Classify a base checkpoint's tensor names into module kinds (Llama, Mistral, Qwen2).

The kind decides how a module's delta is compressed (GraftLLM, Table 5): embedding and
lm_head are pruned and stored sparse, attention and MLP projections become low-rank
factors, norms and biases are kept exactly. SmolLM and Mistral use Llama's names;
Qwen2 adds q/k/v biases.
"""
from __future__ import annotations

import re

KINDS = ("embedding", "lm_head", "attention", "mlp", "norm", "bias", "other")

EMBEDDING_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"

_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight$")
_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$")
_NORM = re.compile(r"^model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm)|norm)\.weight$")
_BIAS = re.compile(r"\.bias$")

# which kinds are stored how (docs/FORMAT.md: lowrank | sparse | exact)
METHOD_OF_KIND = {
    "embedding": "sparse", "lm_head": "sparse", "attention": "lowrank", "mlp": "lowrank",
    "norm": "exact", "bias": "exact", "other": "exact",
}
# stored exactly whatever the budget: tiny, and a norm weight scales a whole channel
ALWAYS_STORED_KINDS = ("norm", "bias")


def module_kind(name: str) -> str:
    """The kind of the base tensor called `name` (one of KINDS)."""
    if name == EMBEDDING_NAME:
        return "embedding"
    if name == LM_HEAD_NAME:
        return "lm_head"
    if _ATTENTION.match(name):
        return "attention"
    if _MLP.match(name):
        return "mlp"
    if _NORM.match(name):
        return "norm"
    if _BIAS.search(name):
        return "bias"
    return "other"


def storage_method(kind: str, shape: tuple[int, ...]) -> str:
    """How a module of `kind` and `shape` is stored; only 2-D weights can be low-rank or sparse."""
    if kind not in METHOD_OF_KIND:
        raise ValueError(f"module kind {kind!r} is unknown; expected one of {KINDS}.")
    method = METHOD_OF_KIND[kind]
    return method if len(shape) == 2 or method == "exact" else "exact"
