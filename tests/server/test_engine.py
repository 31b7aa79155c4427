"""The engine end to end on the base model: continuous batching, chunked prefill, sampling,
logprobs, stop ids, bounds and aborts. The oracle is transformers' forward, token by token."""
from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from skillpack_server.engine.engine import Engine
from skillpack_server.engine.sampling import sample_tokens, top_p_filter
from skillpack_server.engine.types import GenerationRequest, SamplingParams
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.settings import EngineSettings
from testbed.tiny_models import build_tiny_pair

PROMPTS = [[5, 17, 99, 3, 250, 11, 7, 42, 8, 12, 30], [8, 9, 10], [300, 2, 77, 77, 120, 64, 1], [44]]


def greedy_reference(model, prompt: list[int], n: int):
    """Greedy tokens and their logprobs (and the log-softmax rows) from transformers."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    return tokens, logprobs


async def collect(engine, request):
    return [ev async for ev in engine.generate(request)]


def run(coro):
    return asyncio.run(coro)


def greedy(prompt, n=8, rid="r", packs=(), **kw):
    kw.setdefault("logprobs", 0)
    return GenerationRequest(rid, list(prompt), list(packs),
                             SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw))


@pytest.fixture(scope="module")
def pair(tiny_root, tiny_tokenizer):
    return build_tiny_pair("qwen2", tiny_root, tiny_tokenizer)


@pytest.fixture(scope="module")
def hf(pair):
    return transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(pair, tiny_tokenizer):
    # a small step budget so longer prompts are prefilled in several chunks
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=4, max_model_len=48, page_size=4,
                                           max_step_tokens=6, max_queue=8), tokenizer=tiny_tokenizer)
    yield eng
    eng.close()


def test_concurrent_greedy_requests_match_transformers(engine, hf):
    async def burst():
        return await asyncio.gather(*[collect(engine, greedy(p, 8, f"r{i}")) for i, p in enumerate(PROMPTS)])

    for prompt, events in zip(PROMPTS, run(burst())):
        want_tokens, want_lp = greedy_reference(hf, prompt, 8)
        assert [e.token_id for e in events] == want_tokens
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(want_lp),
                                   atol=1e-4, rtol=0)
        assert [e.finish_reason for e in events] == [None] * 7 + ["length"]
    assert engine.stats()["kv_tokens_free"] == engine.stats()["kv_tokens_total"]


def test_new_requests_join_the_running_batch(engine, hf):
    async def scenario():
        running_when_joined = []
        long = engine.generate(greedy(PROMPTS[0], 30, "long"))
        first = [await long.__anext__()]

        async def late():
            out = []
            async for ev in engine.generate(greedy(PROMPTS[1], 6, "late")):
                if not out:
                    running_when_joined.append(engine.stats()["running"])
                out.append(ev)
            return out

        rest, late_events = await asyncio.gather(collect_rest(long), late())
        return first + rest, late_events, running_when_joined

    async def collect_rest(gen):
        return [ev async for ev in gen]

    long_events, late_events, running = run(scenario())
    assert running == [2]  # the late request ran alongside the long one
    assert [e.token_id for e in long_events] == greedy_reference(hf, PROMPTS[0], 30)[0]
    assert [e.token_id for e in late_events] == greedy_reference(hf, PROMPTS[1], 6)[0]


def test_top_logprobs_and_prompt_logprobs_match_transformers(engine, hf):
    prompt = PROMPTS[2]
    events = run(collect(engine, greedy(prompt, 3, logprobs=3, prompt_logprobs=True)))
    prompt_events, gen = events[: len(prompt)], events[len(prompt):]
    assert [e.token_id for e in prompt_events] == prompt and all(e.is_prompt for e in prompt_events)
    assert prompt_events[0].logprob is None
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + [e.token_id for e in gen]])).logits[0].float(), -1)
    for j in range(1, len(prompt)):
        assert abs(prompt_events[j].logprob - float(logp[j - 1, prompt[j]])) < 1e-4
    for i, ev in enumerate(gen):
        row = logp[len(prompt) - 1 + i]
        values, ids = row.topk(3)
        assert [t for t, _ in ev.top_logprobs] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in ev.top_logprobs]), values, atol=1e-4, rtol=0)


def test_stop_token_ends_the_request(engine, hf):
    want, _ = greedy_reference(hf, PROMPTS[0], 8)
    stop = want[3]
    first = want.index(stop)
    events = run(collect(engine, greedy(PROMPTS[0], 8, stop_token_ids=[stop])))
    assert [e.token_id for e in events] == want[: first + 1]
    assert events[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine):
    def sampled(seed, temperature=1.0, top_p=1.0):
        req = GenerationRequest("s", PROMPTS[1], [], SamplingParams(max_tokens=12, temperature=temperature,
                                                                    top_p=top_p, seed=seed, ignore_eos=True))
        return [e.token_id for e in run(collect(engine, req))]

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    # a nucleus this small keeps only the most likely token: sampling becomes greedy
    greedy_tokens = [e.token_id for e in run(collect(engine, greedy(PROMPTS[1], 12)))]
    assert sampled(3, top_p=1e-6) == greedy_tokens


def test_top_p_filter_matches_a_sorted_loop():
    g = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        probs = torch.softmax(torch.randn(50, generator=g) * 3, -1)
        expected = torch.zeros_like(probs)
        mass = 0.0
        for i in probs.argsort(descending=True).tolist():
            if mass >= top_p:
                break
            expected[i] = probs[i]
            mass += float(probs[i])
        torch.testing.assert_close(top_p_filter(probs.clone(), top_p), expected)


def test_sampling_follows_the_distribution():
    """Temperature-scaled draws: empirical frequencies within 4 sigma of softmax(l / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.stack([sample_tokens(logits.clone(), [0.7], [1.0], [g]) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / n
    want = torch.softmax(logits[0] / 0.7, -1)
    assert ((freq - want).abs() <= 4 * (want * (1 - want) / n).sqrt() + 1e-3).all()


def test_bad_requests_are_refused_with_sentences(engine):
    with pytest.raises(DomainError, match="maximum context length is 48 tokens; the prompt has 48") as e:
        run(collect(engine, greedy([1] * 48)))
    assert status_of(e.value) == 400
    with pytest.raises(DomainError, match="Token id 384 in the prompt is outside the vocabulary"):
        run(collect(engine, greedy([1, 384])))
    with pytest.raises(DomainError, match="top_p=0"):
        run(collect(engine, GenerationRequest("x", [1], [], SamplingParams(top_p=0))))
    with pytest.raises(DomainError, match="The model 'missing' does not exist") as e:
        run(collect(engine, greedy([1], packs=[("missing", 1.0)])))
    assert status_of(e.value) == 404


def test_generation_stops_at_max_model_len(engine, hf):
    prompt = [7] * 44
    events = run(collect(engine, greedy(prompt, 10)))
    assert len(events) == 4 and events[-1].finish_reason == "length"  # 44 + 4 = max_model_len 48


def test_closing_the_generator_aborts_and_frees_kv(engine):
    async def scenario():
        gen = engine.generate(greedy(PROMPTS[0], 40))
        got = [await gen.__anext__() for _ in range(2)]
        await gen.aclose()
        for _ in range(200):
            stats = engine.stats()
            if stats["running"] == 0 and stats["kv_tokens_free"] == stats["kv_tokens_total"]:
                return got, stats
            await asyncio.sleep(0.01)
        return got, engine.stats()

    got, stats = run(scenario())
    assert len(got) == 2
    assert stats["running"] == 0 and stats["kv_tokens_free"] == stats["kv_tokens_total"]


def test_requests_beyond_the_kv_budget_queue_and_all_finish(pair, tiny_tokenizer, hf):
    # room for one 24-token request at a time: the others wait for its pages
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=4, max_model_len=24, kv_budget_tokens=24,
                                           page_size=4, max_step_tokens=8), tokenizer=tiny_tokenizer)
    try:
        async def burst():
            seen = []

            async def one(i, prompt):
                out = []
                async for ev in eng.generate(greedy(prompt, 24 - len(prompt), f"k{i}")):
                    seen.append(eng.stats()["running"])
                    out.append(ev)
                return out

            results = await asyncio.gather(*[one(i, p) for i, p in enumerate(PROMPTS[:3])])
            return results, seen

        results, seen = run(burst())
        assert max(seen) == 1
        for prompt, events in zip(PROMPTS, results):
            assert [e.token_id for e in events] == greedy_reference(hf, prompt, 24 - len(prompt))[0]
    finally:
        eng.close()


def test_queue_bound_returns_429(pair, tiny_tokenizer):
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=1, max_model_len=48, max_queue=1,
                                           page_size=4, max_step_tokens=8), tokenizer=tiny_tokenizer)
    try:
        async def scenario():
            running = eng.generate(greedy(PROMPTS[0], 30, "a"))
            await running.__anext__()  # "a" holds the only batch row
            waiting = asyncio.ensure_future(collect(eng, greedy(PROMPTS[1], 2, "b")))
            for _ in range(100):
                if eng.stats()["queue_depth"] == 1:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(DomainError, match="max_queue=1") as e:
                await collect(eng, greedy(PROMPTS[2], 2, "c"))
            assert status_of(e.value) == 429
            await running.aclose()
            return await waiting

        assert len(run(scenario())) == 2
    finally:
        eng.close()


def test_closed_engine_refuses_with_503(pair, tiny_tokenizer):
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=1, max_model_len=16, page_size=4,
                                           max_step_tokens=4), tokenizer=tiny_tokenizer)
    eng.close()
    with pytest.raises(DomainError) as e:
        run(collect(eng, greedy([1, 2], 2)))
    assert status_of(e.value) == 503


def test_engine_config_bounds_are_checked(pair, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_step_tokens=2 is below max_batch=4"):
        EngineSettings(max_batch=4, max_step_tokens=2)
    with pytest.raises(ValueError, match="kv_budget_tokens=16 cannot hold one request of max_model_len=32"):
        Engine(pair.base, EngineSettings(device="cpu", max_model_len=32, kv_budget_tokens=16, page_size=4),
               tokenizer=tiny_tokenizer)


@pytest.mark.slow
def test_default_base_greedy_matches_transformers():
    """SmolLM2-135M-Instruct (the default base, fp32): the engine's greedy completion of a
    chat prompt equals transformers' token by token."""
    from transformers import AutoTokenizer

    from skillpacks.default_base import default_base_dir

    base = default_base_dir()
    tok = AutoTokenizer.from_pretrained(base)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                          add_generation_prompt=True, tokenize=True)["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    want_tokens, want_lp = greedy_reference(model, prompt, 16)
    eng = Engine(base, EngineSettings(device="cpu", max_batch=2, max_model_len=256, max_step_tokens=64))
    try:
        events = run(collect(eng, greedy(prompt, 16)))
    finally:
        eng.close()
    assert [e.token_id for e in events] == want_tokens
    torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(want_lp), atol=1e-3, rtol=0)


def test_compact_cpu_factors_without_their_kernels_is_a_setting_error(pair, tiny_tokenizer, monkeypatch, tmp_path):
    from skillpack_kernels import lowrank_compact
    from skillpack_server.engine.config import ConfigError

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SKILLPACK_CACHE", str(tmp_path / "cache"))  # no kernels built there
    lowrank_compact.library.cache_clear()
    try:
        with pytest.raises(ConfigError, match="cpu_factors='compact' needs the compact CPU kernels") as e:
            Engine(pair.base, EngineSettings(device="cpu", max_model_len=48, cpu_factors="compact"),
                   tokenizer=tiny_tokenizer)
        assert e.value.field == "cpu_factors"
        eng = Engine(pair.base, EngineSettings(device="cpu", max_model_len=48), tokenizer=tiny_tokenizer)
        try:  # "auto" falls back to the float32 factors
            assert eng.model.model.layers[0].mlp.up_proj.lowrank.cpu_form == "dense"
        finally:
            eng.close()
    finally:
        monkeypatch.delenv("CC")
        monkeypatch.delenv("SKILLPACK_CACHE")
        lowrank_compact.library.cache_clear()
