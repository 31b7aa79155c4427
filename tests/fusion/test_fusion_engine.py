"""Weighted fusion in one forward pass, through the engine: a row with [(a, wa), (b, wb), ...]
gives the greedy tokens and logprobs of transformers' model with base + Σ w·Δ (the packs'
own dense deltas); bad weights and names are refused."""
from __future__ import annotations

import pytest
import torch

from skillpack_server.engine.engine import Engine
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.settings import EngineSettings
from skillpacks.format import read_pack
from tests.server.test_engine import collect, greedy, greedy_reference, run
from tests.server.test_runtime import merged_model

PROMPTS = [[5, 17, 99, 3, 250, 11, 7, 42], [300, 2, 77, 77, 120]]
NEW_TOKENS = 6
ATOL = 1e-4
MIXES = [
    (("arith", 0.5), ("json", 0.5)),
    (("arith", 1.0), ("json", -0.5), ("sql", 0.25)),
    (("json", 0.3),),
]


def make_engine(fusion, tokenizer, names=("arith", "json", "sql"), **overrides):
    cfg = dict(device="cpu", max_batch=8, max_model_len=48, page_size=4, max_step_tokens=32, pack_slots=4)
    eng = Engine(fusion.pair.base, EngineSettings(**(cfg | overrides)), tokenizer=tokenizer,
                 fingerprint=fusion.fingerprint)
    for name in names:
        eng.pack_cache.register(name, str(fusion.paths[name]))
    return eng


@pytest.fixture(scope="module")
def engine(fusion, tiny_tokenizer):
    eng = make_engine(fusion, tiny_tokenizer)
    yield eng
    eng.close()


@pytest.mark.parametrize("mix", MIXES, ids=["half-half", "three-signed", "scaled-one"])
def test_fused_row_equals_the_merged_model(fusion, engine, mix):
    oracle = merged_model(fusion.pair.base, [(read_pack(fusion.paths[n]).deltas, w) for n, w in mix])
    for prompt in PROMPTS:
        events = run(collect(engine, greedy(prompt, NEW_TOKENS, packs=mix)))
        tokens, logprobs = greedy_reference(oracle, prompt, NEW_TOKENS)
        assert [e.token_id for e in events] == tokens
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                                   atol=ATOL, rtol=0)
    # the mix must differ from each of its packs alone, or a dropped weight could pass
    fused = run(collect(engine, greedy(PROMPTS[0], NEW_TOKENS, packs=mix)))
    for name, _ in mix:
        alone = run(collect(engine, greedy(PROMPTS[0], NEW_TOKENS, packs=[(name, 1.0)])))
        gap = max(abs(a.logprob - b.logprob) for a, b in zip(fused, alone))
        assert [e.token_id for e in fused] != [e.token_id for e in alone] or gap > 100 * ATOL


def test_fused_rows_batched_with_single_pack_rows(fusion, engine):
    """A burst mixing fused, single-pack and base rows: each as its own merged model."""
    import asyncio

    jobs = [((), PROMPTS[0]), (MIXES[0], PROMPTS[0]), ((("sql", 1.0),), PROMPTS[1]), (MIXES[1], PROMPTS[1])]

    async def burst():
        return await asyncio.gather(*[collect(engine, greedy(p, NEW_TOKENS, f"b{i}", packs=m))
                                      for i, (m, p) in enumerate(jobs)])

    for (mix, prompt), events in zip(jobs, run(burst())):
        oracle = merged_model(fusion.pair.base, [(read_pack(fusion.paths[n]).deltas, w) for n, w in mix])
        tokens, logprobs = greedy_reference(oracle, prompt, NEW_TOKENS)
        assert [e.token_id for e in events] == tokens
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("packs, status, text", [
    ([("arith", float("nan"))], 400, "weight nan; expected a finite number"),
    ([("arith", float("inf"))], 400, "weight inf; expected a finite number"),
    ([("nope", 1.0)], 404, "'nope' does not exist"),
])
def test_engine_refuses_bad_weights_and_names(engine, packs, status, text):
    with pytest.raises(DomainError) as e:
        run(collect(engine, greedy(PROMPTS[0], 2, packs=packs)))
    assert status_of(e.value) == status and text in str(e.value)


def test_engine_refuses_more_packs_than_it_can_fuse(fusion, tiny_tokenizer):
    eng = make_engine(fusion, tiny_tokenizer, pack_slots=2)
    try:
        with pytest.raises(DomainError, match="names 3 packs; at most 2"):
            run(collect(eng, greedy(PROMPTS[0], 2, packs=list(MIXES[1]))))
    finally:
        eng.close()
