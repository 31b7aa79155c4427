"""lm-evaluation-harness's `local-completions` against a real uvicorn: the per-item loglikelihoods
are the same whether it sends 4 prompts per request or 1, and equal transformers' own sums.
Run by hand (`pip install -e ".[harness]"`, then `pytest -m slow tests/server/test_lm_eval_harness.py`)."""
from __future__ import annotations

import httpx
import pytest
import torch
import transformers

from tests.server.test_api_common import live_server, settings_for

pytestmark = pytest.mark.slow

PAIRS = [("def wrap(text, width):", "\n    return"), ("import os", "\nimport sys"), ("class Stack:", " pass"),
         ("x = [1, 2,", " 3]"), ("for i in range(10):", "\n    print(i)"), ("if __name__ ==", " '__main__':")]


def harness(url: str, model: str, tokenizer_dir, batch_size: int):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=model, tokenizer_backend="huggingface",
                               tokenizer=str(tokenizer_dir), batch_size=batch_size, max_retries=1, num_concurrent=1)


def completions_served(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("skillpack_http_requests_total") and '"/v1/completions"' in line))


def instances():
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(PAIRS)]


def reference(base, tokenizer, ctx: str, cont: str) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ctx_ids, cont_ids = tokenizer.encode(ctx), tokenizer.encode(cont)
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx_ids) + i - 1, t] for i, t in enumerate(cont_ids)))


def test_batched_loglikelihoods_equal_single_ones(llama, tmp_path, tiny_tokenizer):
    with live_server(settings_for(llama, tmp_path, max_batch=8)) as url:
        model = llama.base.resolve().name
        one = harness(url, model, llama.base, 1).loglikelihood(instances())
        after_one = completions_served(url)
        four = harness(url, model, llama.base, 4).loglikelihood(instances())
        assert (after_one, completions_served(url) - after_one) == (6, 2)  # 6 lone prompts, then 4 + 2
    assert [g for _, g in one] == [g for _, g in four]
    assert [lp for lp, _ in four] == pytest.approx([lp for lp, _ in one], abs=1e-4)
    for (ctx, cont), (lp, _) in zip(PAIRS, one):
        assert lp == pytest.approx(reference(llama.base, tiny_tokenizer, ctx, cont), abs=1e-3)
