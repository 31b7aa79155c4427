"""Logits processing before sampling (logit_bias, presence/frequency penalties, min_tokens, token
constraints), each row its own, in one batch. The oracle is transformers' forward with the same
arithmetic written out by hand, token by token."""
from __future__ import annotations

import asyncio

import pytest
import torch

from skillpack_server.engine.engine import Engine
from skillpack_server.engine.logits import allowed_tokens
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.settings import EngineSettings
from tests.server.test_engine import PROMPTS, collect, greedy, hf, pair, run  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def engine(pair, tiny_tokenizer):  # noqa: F811
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=8, max_model_len=48, page_size=4,
                                           max_step_tokens=64), tokenizer=tiny_tokenizer)
    yield eng
    eng.close()


def reference(model, prompt, n, bias=None, presence=0.0, frequency=0.0, banned_until=None):
    """Greedy decoding with the processing written out: bias, penalties over generated tokens,
    `banned_until = (ids, k)` masks ids for the first k tokens."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for step in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float().clone()
            for t, b in (bias or {}).items():
                logits[t] += b
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            logits -= frequency * counts + presence * (counts > 0).float()
            if banned_until and step < banned_until[1]:
                logits[list(banned_until[0])] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    return out


class OnlyTokens:
    """A constraint that allows a fixed set of tokens and records what it was given."""

    def __init__(self, allowed: set[int], vocab_size: int):
        self.allowed, self.vocab_size, self.seen = allowed, vocab_size, []

    def fill_mask(self, words):
        for t in self.allowed:
            words[t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)

    def accept(self, token: int) -> bool:
        self.seen.append(token)
        return token in self.allowed


def test_each_row_gets_its_own_processing_in_one_batch(engine, hf):  # noqa: F811
    prompt = PROMPTS[0]
    plain = reference(hf, prompt, 6)
    favourite = (plain[0] + 7) % 300
    rows = {
        "plain": greedy(prompt, 6, "plain"),
        "bias": greedy(prompt, 6, "bias", logit_bias={favourite: 100.0}),
        "presence": greedy(prompt, 6, "presence", presence_penalty=2.0),
        "frequency": greedy(prompt, 6, "frequency", frequency_penalty=1.5),
    }

    async def batch():
        return await asyncio.gather(*[collect(engine, r) for r in rows.values()])

    got = {name: [e.token_id for e in events] for name, events in zip(rows, run(batch()))}
    assert got["plain"] == plain
    assert got["bias"] == reference(hf, prompt, 6, bias={favourite: 100.0}) == [favourite] * 6
    assert got["presence"] == reference(hf, prompt, 6, presence=2.0)
    assert got["frequency"] == reference(hf, prompt, 6, frequency=1.5)
    assert got["presence"] != plain or got["frequency"] != plain  # the penalties changed something


def test_logprobs_stay_the_models_own_under_a_bias(engine, hf):  # noqa: F811
    prompt = PROMPTS[1]
    target = 123
    events = run(collect(engine, greedy(prompt, 1, "b", logit_bias={target: 100.0})))
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert events[0].token_id == target
    assert abs(events[0].logprob - float(raw[target])) < 1e-4


def test_min_tokens_holds_back_stop_ids(engine, hf):  # noqa: F811
    prompt = PROMPTS[2]
    first = reference(hf, prompt, 1)[0]
    stopped = run(collect(engine, greedy(prompt, 6, "s", stop_token_ids=[first])))
    assert [e.token_id for e in stopped] == [first] and stopped[-1].finish_reason == "stop"
    held = run(collect(engine, greedy(prompt, 6, "m", stop_token_ids=[first], min_tokens=3)))
    tokens = [e.token_id for e in held]
    assert tokens[:3] == reference(hf, prompt, 3, banned_until=({first}, 3)) and first not in tokens[:3]


def test_a_constraint_masks_its_row_only_and_a_dead_end_fails_alone(engine, hf):  # noqa: F811
    vocab = hf.config.vocab_size
    allowed = {3, 40, 77, 301}
    only = OnlyTokens(allowed, vocab)
    nothing = OnlyTokens(set(), vocab)
    requests = [greedy(PROMPTS[0], 5, "only", constraint=only), greedy(PROMPTS[0], 5, "free"),
                greedy(PROMPTS[3], 5, "dead", constraint=nothing)]

    async def batch():
        return await asyncio.gather(*[collect(engine, r) for r in requests], return_exceptions=True)

    constrained, free, dead = run(batch())
    tokens = [e.token_id for e in constrained]
    assert set(tokens) <= allowed and only.seen == tokens and len(tokens) == 5
    # the oracle: greedy over the allowed ids only
    with torch.no_grad():
        ids = list(PROMPTS[0])
        for token in tokens:
            logits = hf(torch.tensor([ids])).logits[0, -1]
            assert token == max(allowed, key=lambda t: float(logits[t]))
            ids.append(token)
    assert [e.token_id for e in free] == reference(hf, PROMPTS[0], 5)
    assert isinstance(dead, DomainError) and dead.code == "grammar_dead_end"
    assert engine.stats()["kv_tokens_free"] == engine.stats()["kv_tokens_total"]


def test_bitmask_unpacking_matches_a_loop():
    torch.manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    got = allowed_tokens(words, 140, [140, 100, 128])
    for r in range(3):
        for t in range(140):
            want = bool((int(words[r, t // 32]) >> (t % 32)) & 1) if t < [140, 100, 128][r] and t < 128 else False
            assert bool(got[r, t]) == want, (r, t)


@pytest.mark.parametrize("field, value", [("min_tokens", 9), ("presence_penalty", 2.5), ("frequency_penalty", -3),
                                          ("logit_bias", {10**7: 1.0}), ("logit_bias", {5: 101.0})])
def test_out_of_range_processing_is_refused_by_name(engine, field, value):
    with pytest.raises(DomainError) as caught:
        run(collect(engine, greedy(PROMPTS[1], 8, "x", **{field: value})))
    assert caught.value.param == field and status_of(caught.value) == 400
