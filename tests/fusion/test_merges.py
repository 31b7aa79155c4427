"""The fusion baselines and the ensemble against slow, obvious versions: TIES and task
arithmetic element by element in float64, the top-k ensemble against full recomputation
of every model's log-softmax at every step (no KV cache, no padding)."""
from __future__ import annotations

import pytest
import torch
import transformers

from skillpack_evals.fusion_eval import ensemble_generate, task_arithmetic, ties_merge, ties_tensor


def ties_reference(tensors: list[torch.Tensor], density: float) -> torch.Tensor:
    flat = [t.double().flatten().tolist() for t in tensors]
    n = len(flat[0])
    keep = max(1, -(-int(density * n * 1000) // 1000))  # ceil(density * n) without float surprises
    trimmed = []
    for values in flat:
        order = sorted(range(n), key=lambda i: -abs(values[i]))[:keep]
        trimmed.append([values[i] if i in order else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        column = [t[i] for t in trimmed]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agreeing = [v for v in column if v != 0 and ((v > 0) - (v < 0)) == sign]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(tensors[0].shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(5, 7), (13,)])
def test_ties_matches_elementwise_reference(density, shape):
    g = torch.Generator().manual_seed(sum(shape))
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(ties_tensor(tensors, density), ties_reference(tensors, density))


def test_merges_over_dicts_scale_and_union():
    a = {"x": torch.tensor([1.0, -2.0, 3.0]), "y": torch.tensor([4.0])}
    b = {"x": torch.tensor([-1.0, -1.0, 1.0])}
    ta = task_arithmetic([a, b], 0.5)
    torch.testing.assert_close(ta["x"], torch.tensor([0.0, -1.5, 2.0]))
    torch.testing.assert_close(ta["y"], torch.tensor([2.0]))
    ties = ties_merge([a, b], 2.0, density=1.0)
    # x: signs elected from the sums (0 -> 0, -3 -> -, 4 -> +); y: alone
    torch.testing.assert_close(ties["x"], 2.0 * torch.tensor([0.0, -1.5, 2.0]))
    torch.testing.assert_close(ties["y"], torch.tensor([8.0]))


def reference_ensemble(models, weights, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out])
            total = sum(w * torch.log_softmax(m(x).logits[0, -1].float(), -1) for m, w in zip(models, weights))
            token = int(total.argmax())
            out.append(token)
            if token in eos:
                break
    return out


def test_ensemble_matches_full_recomputation(fusion, tiny_tokenizer):
    base = transformers.AutoModelForCausalLM.from_pretrained(fusion.pair.base, dtype=torch.float32).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(fusion.pair.tuned, dtype=torch.float32).eval()
    prompts = ["Compute (3 + 4) * 5 - 6.", "hi", "Table employees(name, dept). Write the SQL query: count them"]
    eos = {tiny_tokenizer.eos_token_id}
    n = 7
    for models, weights in (([base], [1.0]), ([base, tuned], [0.5, 0.5]), ([base, tuned], [0.2, 0.8])):
        got = ensemble_generate(models, weights, tiny_tokenizer, prompts, n, batch_size=3)  # padded batch
        for prompt, text in zip(prompts, got):
            ids = tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)
            want = reference_ensemble(models, weights, ids, n, eos)
            assert text == tiny_tokenizer.decode(want, skip_special_tokens=True), (weights, prompt)
    with pytest.raises(ValueError, match="2 models and 1 weights"):
        ensemble_generate([base, tuned], [1.0], tiny_tokenizer, prompts, 2)
