"""The builder's side of Qwen3, Gemma 2, Gemma 3 and Phi-3: a real peft LoRA on each imports (the
fused Phi-3 modules as they are), and the hooks' rank sensitivity is the Fisher along each
singular direction of transformers' own float64 parameter gradients (Gemma's scaled embedding
and capped logits, Phi-3's fused weights).

The oracle here is autograd, not central differences as in test_sensitivity.py: Gemma's norms
and eager softmax cast to float32 even in a float64 model, which puts ~1e-7 noise on log p,
several percent of the tail directions' difference quotients; the gradient of the same float64
model has no such step and agrees with the hooks to ~1e-6.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from skillpacks.compress import delta_svd
from skillpacks.sensitivity import rank_sensitivity
from testbed.tiny_models import NEW_ARCHS, build_tiny_pair
from tests.skillpacks.test_peft import check_export_loads_in_peft, check_import_then_merge
from tests.skillpacks.test_sensitivity import RANKS, RECORDS, _deltas, sampled_labels

LORA_TARGETS = {
    "qwen3": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
    "gemma3": ["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused modules, targeted whole
}
SENSITIVITY_NAMES = {
    "gemma2": ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"],  # tied, scaled, capped
    "gemma3": ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"],
    "phi3": ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight", "lm_head.weight"],
}


@pytest.mark.parametrize("arch", sorted(NEW_ARCHS))
def test_a_peft_lora_imports_and_merges_like_peft(arch, tiny_root, tiny_tokenizer, tmp_path):
    check_import_then_merge(build_tiny_pair(arch, tiny_root, tiny_tokenizer), tmp_path, LORA_TARGETS[arch])


def _gradient_fisher(pair, records, names, ranks, seed=0):
    """The oracle: Σ over records of (uᵢᵀ ∇W log p(ỹ) vᵢ)² from the float64 model's full parameter
    gradient (transformers' forward and backward), labels drawn as rank_sensitivity draws them."""
    model, batches, labels = sampled_labels(pair, records, seed)
    model.double().requires_grad_(False)
    params = dict(model.named_parameters())
    vectors = {n: delta_svd(d) for n, d in _deltas(pair).items() if n in names}
    out = {n: torch.zeros(len(ranks), dtype=torch.float64) for n in names}
    for n in names:
        params[n].requires_grad_(True)
    for batch, y in zip(batches, labels):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"][:, 1:] != -100
        torch.log_softmax(logits[:, :-1][keep], dim=-1).gather(1, y[:, None]).sum().backward()
        for n in names:
            u, _, vh = vectors[n]
            grad = params[n].grad
            out[n] += torch.stack([(u[:, i].double() @ grad @ vh[i].double()) ** 2 for i in ranks])
    tokens = sum(y.numel() for y in labels)
    return {n: v / tokens for n, v in out.items()}, tokens


def test_a_pack_on_fused_modules_exports_as_a_peft_adapter_peft_loads(tiny_root, tiny_tokenizer, tmp_path):
    check_export_loads_in_peft(build_tiny_pair("phi3", tiny_root, tiny_tokenizer), tmp_path)


@pytest.mark.parametrize("arch", sorted(SENSITIVITY_NAMES))
def test_rank_sensitivity_is_the_fisher_along_each_singular_direction(arch, tiny_root, tiny_tokenizer):
    pair = build_tiny_pair(arch, tiny_root, tiny_tokenizer)
    names, records = SENSITIVITY_NAMES[arch], RECORDS[:4]
    deltas = _deltas(pair)
    fisher, tokens = rank_sensitivity(pair.tuned, records, names, deltas.__getitem__, device="cpu")
    oracle, oracle_tokens = _gradient_fisher(pair, records, names, RANKS)
    assert tokens == oracle_tokens > 0
    for n in names:
        assert fisher[n].shape == (min(deltas[n].shape),)
        # float32 projections against the float64 gradient
        assert torch.allclose(fisher[n][RANKS], oracle[n], rtol=1e-3, atol=1e-6 * float(oracle[n].max())), n
        assert float(oracle[n].max()) > 10 * float(oracle[n].min())  # directions differ: not one constant


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_bf16_moves_the_sensitivity_far_less_than_its_sampling_noise(arch, tiny_root, tiny_tokenizer):
    """A bf16 checkpoint is measured in bf16: over the top ranks, the median relative change of fᵢ from
    float32 must stay well under the change that another draw of the labels makes."""
    pair = build_tiny_pair(arch, tiny_root, tiny_tokenizer)
    deltas = _deltas(pair)
    names = ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    run = lambda **kw: rank_sensitivity(pair.tuned, RECORDS, names, deltas.__getitem__, device="cpu", **kw)[0]  # noqa: E731
    f32, other_draw, bf16 = run(), run(seed=1), run(dtype=torch.bfloat16)
    for n in names:
        change = lambda f: float(((f[n][:16] - f32[n][:16]).abs() / f32[n][:16]).median())  # noqa: E731
        assert change(bf16) < 0.06 and change(bf16) < 0.25 * change(other_draw), (n, change(bf16), change(other_draw))


def test_a_bf16_checkpoint_runs_in_bf16_without_a_float32_copy(tiny_root, tiny_tokenizer, tmp_path):
    from skillpacks.checkpoint import load_causal_lm, open_checkpoint, run_dtype

    pair = build_tiny_pair("qwen3", tiny_root, tiny_tokenizer)
    AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(pair.base).save_pretrained(tmp_path / "bf16")
    assert run_dtype(open_checkpoint(pair.base)) == torch.float32
    assert run_dtype(open_checkpoint(tmp_path / "bf16")) == torch.bfloat16
    _, model = load_causal_lm(tmp_path / "bf16", "testing")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
