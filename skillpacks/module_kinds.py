"""Classify a base checkpoint's tensor names into module kinds (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3),
and the linears a LoRA adapter changes (any architecture).

The kind decides how a module's delta is compressed. Budget builds store every weight
matrix low-rank, embedding and lm_head included, and norms and biases exactly. The
`graftllm` preset follows the paper (GraftLLM, Table 5) and prunes the embedding and
lm_head deltas to sparse entries instead: a full fine-tune moves every vocabulary row
along a few shared directions (Adam's update reaches rows whose gradient is tiny), so at
equal bytes a low-rank embedding delta keeps far more of it (docs/BUILD.md). SmolLM and
Mistral use Llama's names; Qwen2 adds q/k/v biases; Qwen3 and Gemma 3 per-head `q_norm` /
`k_norm`; Gemma 2/3 `pre_feedforward_layernorm` / `post_feedforward_layernorm`. Phi-3's
fused `qkv_proj` and `gate_up_proj` are one module each (attention, mlp): the delta of a
fused weight is stored whole (docs/FORMAT.md, "Fused projections").
"""
from __future__ import annotations

import re

KINDS = ("embedding", "lm_head", "attention", "mlp", "norm", "bias", "other")

EMBEDDING_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"

_ATTENTION = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k|v|o|qkv)_proj\.weight$")
_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.(gate|up|down|gate_up)_proj\.weight$")
_NORM = re.compile(r"^model\.(layers\.\d+\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
                   r"|post_feedforward_layernorm|self_attn\.[qk]_norm)|norm)\.weight$")
_BIAS = re.compile(r"\.bias$")

# which kinds are stored how (docs/FORMAT.md: lowrank | sparse | exact)
METHOD_OF_KIND = {
    "embedding": "lowrank", "lm_head": "lowrank", "attention": "lowrank", "mlp": "lowrank",
    "norm": "exact", "bias": "exact", "other": "exact",
}
# the paper's recipe (`--preset graftllm`): embedding and lm_head magnitude-pruned
PAPER_METHOD_OF_KIND = {**METHOD_OF_KIND, "embedding": "sparse", "lm_head": "sparse"}
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


def lora_target_kind(name: str) -> str:
    """The kind recorded for the weight `name` of a linear a LoRA adapter changes: "attention" or
    "mlp" by the block that holds it, else "other".

    Not `module_kind`: that one names every tensor of the supported families exactly,
    because a build compresses each kind its own way. An adapter changes linears only and
    may come from any architecture (`.attention.` and `.feed_forward.` blocks too), so the
    block's name decides; a head adapter (`lm_head.weight`) is "other" here, and
    `skillpack export-peft` writes it back.
    """
    if ".self_attn." in name or ".attention." in name:
        return "attention"
    if ".mlp." in name or ".feed_forward." in name:
        return "mlp"
    return "other"


def storage_method(kind: str, shape: tuple[int, ...], paper: bool = False) -> str:
    """How a module of `kind` and `shape` is stored (`paper`: the graftllm preset's choice);
    only 2-D weights can be low-rank or sparse."""
    if kind not in METHOD_OF_KIND:
        raise ValueError(f"module kind {kind!r} is unknown; expected one of {KINDS}.")
    method = (PAPER_METHOD_OF_KIND if paper else METHOD_OF_KIND)[kind]
    return method if len(shape) == 2 or method == "exact" else "exact"
