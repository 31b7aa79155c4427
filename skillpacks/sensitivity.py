"""How much each singular direction of a fine-tune's delta matters to the model's outputs.

Dropping rank i of ΔW = Σᵢ σᵢ uᵢ vᵢᵀ moves W by −σᵢ uᵢ vᵢᵀ. To second order the KL
divergence of the tuned model's next-token distributions from the moved model's, summed
over the calibration tokens, is ½ σᵢ² fᵢ with

    fᵢ = Σ_examples (uᵢᵀ ∇_W log p(ỹ | x) vᵢ)²,

the Fisher information of the tuned model along the direction uᵢ vᵢᵀ. The labels ỹ are
drawn from the tuned model itself at every scored position, so this estimates the true
Fisher (the KL's curvature) rather than the empirical one; the cross terms between
positions of one example have mean zero under that sampling. One backward pass per
example gives diag(Uᵀ ∇_W V), all of a module's directions, for every module at once
(without forming ∇_W: below). `rank_sensitivity` returns fᵢ / tokens per module, in the singular
value order of `compress.delta_svd`.

Why the builder wants it (docs/BUILD.md, "`--sensitivity`"): on a real SmolLM2 fine-tune
fᵢ spans four orders of magnitude within one module (q_proj: 3.7e-10 at rank 0, 3.7e-14
at rank 300), a module's top directions are 10–800x more sensitive than a random
direction of it, and the tied embedding's top directions (it also writes the logits)
exceed those of the linears sampled (1.5e-9 against 2e-11 to 8.5e-10), none of which a size-only
criterion (‖ΔW − ΔŴ‖²) can see.

How it runs: no parameter gradient is ever formed. Every module whose weight is measured
gets hooks: its forward keeps the input projected on the right singular vectors, X V
(tokens, k), its backward projects the output gradient on the left ones, Γ U, and
uᵢᵀ∇W vᵢ = Σ_tokens (ΓU)ᵢ (XV)ᵢ is added to that example's sum, so the weight's gradient
(the size of the model) never exists; the backward pass only carries activation gradients.
A tied head is the embedding's one Parameter used twice: both uses add to the same sum.

The model runs in its checkpoint's precision (`checkpoint.run_dtype`): a float32 fine-tune
(what `skillpack graft` saves) in float32; a bf16 or fp16 one in bf16, its singular vectors
too, with each token's products summed in float32. Rounding to bf16 moves each fᵢ far less
than the estimate's own sampling noise (tiny Gemma 3 / Qwen3 / Phi-3, 24 records: median
0.3–4% over the top ranks, against 14–33% between two draws of the labels; tested).

Memory: the tuned model (2 bytes per parameter in bf16, 4 in float32) and every low-rank
module's singular vectors U, V in the same dtype (k·(out + in) per (out, in) matrix,
k = min(out, in): about 1.25 x the linears' parameters on Qwen2-shaped models, plus
vocab·dim + dim² for the embedding), plus one example's activations; measured against model
size in docs/BUILD.md ("Build memory against model size").
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from skillpacks.checkpoint import load_causal_lm, open_checkpoint, pick_device, run_dtype
from skillpacks.compress import delta_svd
from skillpacks.jsonl import json_lines, open_bounded
from skillpacks.module_kinds import EMBEDDING_NAME, LM_HEAD_NAME
from skillpacks.records import collate, encode_pair, pad_id, response_logits

DEFAULT_EXAMPLES = 64
MAX_EXAMPLES = 4096
MAX_SEQ_TOKENS = 512
MAX_LINES = 1_000_000  # blank lines included; reading stops at MAX_EXAMPLES records
EXPECTED = 'JSON lines with "prompt" and "response", or "text"'


def read_sensitivity_records(path: str | Path) -> list[dict[str, str]]:
    """Calibration records from a JSONL file: {"prompt", "response"} (a chat turn; the response
    positions are scored) or {"text"} (plain text; every position is scored)."""
    records = []
    with open_bounded(path, "sensitivity file", expected=EXPECTED) as f:
        for n, obj, _ in json_lines(f, str(path), MAX_LINES, EXPECTED):
            records.append(check_record(obj, f"{path} line {n}"))
            if len(records) == MAX_EXAMPLES:
                break
    if not records:
        raise ValueError(f"sensitivity file {path} holds no records.")
    return records


def check_record(obj, where: str) -> dict[str, str]:
    """A calibration record as {"prompt", "response"} or {"text"}, every field a non-empty string."""
    if isinstance(obj, dict):
        for fields in (("prompt", "response"), ("text",)):
            if all(isinstance(obj.get(k), str) and obj[k] for k in fields):
                return {k: obj[k] for k in fields}
    raise ValueError(f"{where} is {str(obj)[:80]!r}; expected an object with non-empty string fields "
                     "\"prompt\" and \"response\", or \"text\".")


def _encode(tokenizer, record: dict[str, str], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where nothing is scored) of one record."""
    if "text" in record:
        ids = list(tokenizer(record["text"], truncation=True, max_length=max_len)["input_ids"])
        return ids, list(ids)
    return encode_pair(tokenizer, record["prompt"], record["response"], max_len)


def rank_sensitivity(tuned_dir: str | Path, records: list[dict[str, str]], names: list[str],
                     delta: Callable[[str], torch.Tensor], max_examples: int = DEFAULT_EXAMPLES,
                     seed: int = 0, max_len: int = MAX_SEQ_TOKENS, device: str | None = None,
                     progress: bool = False, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """({name: fᵢ / tokens (float64, one per singular value of that delta)}, tokens scored).

    `names` are the 2-D tensors to measure (parameter names of the tuned model); `delta(name)`
    returns tuned − base of one. Deltas that are all zero are left out. `dtype`: what the model
    runs in (default: `checkpoint.run_dtype` of the tuned checkpoint).
    """
    if not 1 <= max_examples <= MAX_EXAMPLES:
        raise ValueError(f"max_examples={max_examples}; expected 1 to {MAX_EXAMPLES}.")
    records = [check_record(r, f"sensitivity record {i}") for i, r in enumerate(records[:max_examples])]
    if not records:
        raise ValueError("no sensitivity records; expected at least one {\"prompt\", \"response\"} or {\"text\"}.")
    device = pick_device(device)
    dtype = dtype or run_dtype(open_checkpoint(tuned_dir))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_factors(group: list[str]) -> None:
        for name in group:
            d = delta(name)
            if torch.any(d):
                u, _, vh = delta_svd(d)
                factors[name] = (u.to(device, dtype), vh.to(device, dtype))
            del d

    # the vocabulary matrices' SVDs first, before the model is loaded: theirs are the largest (a
    # few times the matrix in workspace), and loading the model briefly maps its whole file too;
    # the other SVDs' workspace is small beside the model (docs/BUILD.md, build memory)
    vocab = [n for n in names if n in (EMBEDDING_NAME, LM_HEAD_NAME)]
    add_factors(vocab)
    tokenizer, model = load_causal_lm(tuned_dir, "measuring sensitivity runs the tuned model", dtype)
    model.to(device).requires_grad_(False)
    params = dict(model.named_parameters())  # a tied head appears once, under the embedding's name
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the tuned model has no parameter '{missing[0]}' ({len(missing)} missing); "
                         "expected the checkpoint's tensor names to be the model's parameter names.")
    add_factors([n for n in names if n not in vocab])
    fisher = {name: torch.zeros(vh.shape[0], dtype=torch.float64, device=device) for name, (_, vh) in factors.items()}
    example = {name: torch.zeros_like(f) for name, f in fisher.items()}  # Σ over this example's tokens of uᵢᵀ∇W vᵢ
    handles = _install_projections(model, params, factors, example)
    pad = pad_id(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    try:
        for record in tqdm(records, desc="sensitivity", disable=not progress, leave=False):
            batch = collate([_encode(tokenizer, record, max_len)], pad, device)
            logits, _, _ = response_logits(model, batch)
            if logits.shape[0] == 0:
                continue
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            for acc in example.values():
                acc.zero_()
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            tokens += labels.numel()
            for name, acc in example.items():
                fisher[name] += acc ** 2
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("the sensitivity records score no token (every response was cut off or empty).")
    return {name: (f / tokens).cpu() for name, f in fisher.items()}, tokens


def _install_projections(model, params: dict, factors: dict, example: dict) -> list:
    """Hooks that add, for every use of a measured weight, Σ_tokens (ΓU)ᵢ (XV)ᵢ to example[name]
    (Γ the gradient of the module's output, X its input); returns their handles."""
    measured = {id(params[name]): name for name in factors}
    handles = []

    def linear_hook(name):
        u, vh = factors[name]

        def forward(module, inputs, output):
            xv = (inputs[0].detach().reshape(-1, vh.shape[1]) @ vh.T).float()  # (T, k)

            def backward(grad):  # returns None: the gradient flows on unchanged
                example[name].add_(((grad.reshape(-1, u.shape[0]) @ u).float() * xv).sum(0).double())

            _require_grad(output, name)
            output.register_hook(backward)
        return forward

    def embedding_hook(name):
        def forward(module, inputs, output):
            output = output if output.requires_grad else output.requires_grad_()  # activations need gradients
            if name is None:
                return output
            u, vh = factors[name]
            ids = inputs[0].reshape(-1)
            # a scaled embedding (Gemma) returns E[ids] · c: the weight's gradient is c times the output's
            scale = float(module.embed_scale.to(module.weight.dtype)) if hasattr(module, "embed_scale") else 1.0

            def backward(grad):
                gv = (grad.reshape(-1, vh.shape[1]) @ vh.T).float()  # (T, k)
                example[name].add_((u[ids].float() * gv).sum(0).double() * scale)

            output.register_hook(backward)
            return output
        return forward

    embedding = model.get_input_embeddings()
    for module in model.modules():
        name = measured.get(id(getattr(module, "weight", None)))
        if module is embedding:  # its output must carry gradients even when its weight is not measured
            handles.append(module.register_forward_hook(embedding_hook(name)))
        elif name is not None and isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif name is not None:
            raise ValueError(f"'{name}' is the weight of a {type(module).__name__}; sensitivity measures linear "
                             "and embedding weights only.")
    return handles


def _require_grad(output: torch.Tensor, name: str) -> None:
    if not output.requires_grad:
        raise ValueError(f"the output of the module using '{name}' carries no gradient; expected every measured "
                         "module to lie between the input embedding and the loss.")
