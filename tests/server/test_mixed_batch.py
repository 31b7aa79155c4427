"""The peft-style mixed-batch check through the whole engine.

Three packs on one base (the real fine-tune's delta and two seeded deltas of the same
shapes and norms), each run alone, then all of them interleaved with base-only rows in
one concurrent burst: every request must give the greedy tokens and logprobs of its
dense merged model (base + the pack's own `delta.dense()`) run by transformers. Then the
serving guarantees with packs in play: a replaced pack's in-flight requests finish on
the old version, eviction never hits an in-use pack, and the queue bound answers 429.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from skillpack_server.engine.engine import Engine
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.settings import EngineSettings
from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import read_pack
from testbed.tiny_models import build_tiny_pair
from tests.server.test_engine import collect, greedy, greedy_reference, run
from tests.server.test_runtime import merged_model, noise_delta, tuned_delta, write_test_pack

PROMPTS = [[5, 17, 99, 3, 250, 11, 7, 42], [8, 9, 10], [300, 2, 77, 77, 120]]
NEW_TOKENS = 6
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # tied embeddings; q/k/v biases
def packs(request, tiny_root, tiny_tokenizer, tmp_path_factory):
    pair = build_tiny_pair(request.param, tiny_root, tiny_tokenizer)
    folder = tmp_path_factory.mktemp(f"mixed-{pair.arch}")
    fp = base_fingerprint(open_checkpoint(pair.base))
    dense = tuned_delta(pair.base, pair.tuned)
    # seeded deltas at four times the fine-tune's norm: outputs far apart from each other
    loud = {name: 4 * d for name, d in dense.items()}
    paths = {
        "skill": write_test_pack(folder / "skill.skillpack", "skill", pair.base, dense, fp),
        "noise-a": write_test_pack(folder / "a.skillpack", "noise-a", pair.base, noise_delta(loud, 11), fp),
        "noise-b": write_test_pack(folder / "b.skillpack", "noise-b", pair.base, noise_delta(loud, 12), fp),
    }
    return pair, fp, paths


def make_engine(pair, fp, paths, tokenizer, **overrides):
    cfg = dict(device="cpu", max_batch=8, max_model_len=48, page_size=4, max_step_tokens=16, pack_slots=4)
    eng = Engine(pair.base, EngineSettings(**(cfg | overrides)), tokenizer=tokenizer, fingerprint=fp)
    for name, path in paths.items():
        eng.pack_cache.register(name, str(path))
    return eng


class Oracles:
    """Greedy references from merged transformers models, computed once per (mix, prompt)."""

    def __init__(self, pair, paths):
        self.pair, self.paths, self.models, self.results = pair, paths, {}, {}

    def __call__(self, mix: tuple[tuple[str, float], ...], prompt: list[int], n: int = NEW_TOKENS):
        key = (mix, tuple(prompt), n)
        if key not in self.results:
            if mix not in self.models:
                self.models[mix] = merged_model(self.pair.base, [(read_pack(self.paths[name]).deltas, w)
                                                                 for name, w in mix])
            self.results[key] = greedy_reference(self.models[mix], prompt, n)
        return self.results[key]


@pytest.fixture(scope="module")
def oracles(packs):
    pair, _, paths = packs
    return Oracles(pair, paths)


def check(events, oracle):
    tokens, logprobs = oracle
    assert [e.token_id for e in events] == tokens
    torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                               atol=LOGPROB_ATOL, rtol=0)


def separated(a, b) -> bool:
    if [e.token_id for e in a] != [e.token_id for e in b]:
        return True
    return max(abs(x.logprob - y.logprob) for x, y in zip(a, b)) > 100 * LOGPROB_ATOL


def test_mixed_burst_equals_each_pack_alone_and_its_merged_model(packs, oracles, tiny_tokenizer):
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer)
    mixes = [(), (("skill", 1.0),), (("noise-a", 1.0),), (("noise-b", 1.0),),
             (("skill", 0.5), ("noise-a", 0.5))]  # base-only rows and a weighted fusion too
    try:
        alone = {}
        for mix in mixes[1:4]:
            alone[mix] = run(collect(eng, greedy(PROMPTS[0], NEW_TOKENS, packs=mix)))
        # interleaved: consecutive rows of the burst use different packs
        jobs = [(mix, prompt) for prompt in PROMPTS for mix in mixes]

        async def burst():
            return await asyncio.gather(*[collect(eng, greedy(p, NEW_TOKENS, f"m{i}", packs=mix))
                                          for i, (mix, p) in enumerate(jobs)])

        results = run(burst())
        for (mix, prompt), events in zip(jobs, results):
            check(events, oracles(mix, prompt))
            if prompt == PROMPTS[0] and mix in alone:
                assert [e.token_id for e in events] == [e.token_id for e in alone[mix]]
                torch.testing.assert_close(torch.tensor([e.logprob for e in events]),
                                           torch.tensor([e.logprob for e in alone[mix]]), atol=1e-5, rtol=0)
        # every two mixes must differ by far more than the tolerance, or a row given the
        # wrong pack could pass unnoticed
        outputs = [ev for (m, p), ev in zip(jobs, results) if p == PROMPTS[0]]
        for i in range(len(outputs)):
            for j in range(i):
                assert separated(outputs[i], outputs[j]), f"mixes {mixes[i]} and {mixes[j]} give the same output"
        stats = eng.stats()
        assert stats["running"] == 0 and stats["packs"] == {}
        assert stats["pack_cache"]["loads"] == 3
    finally:
        eng.close()


def test_replaced_pack_in_flight_requests_finish_on_the_old_version(packs, oracles, tiny_tokenizer):
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer)
    n = 30
    try:
        async def scenario():
            old = eng.generate(greedy(PROMPTS[1], n, "old", packs=[("skill", 1.0)]))
            first = [await old.__anext__()]
            eng.pack_cache.register("skill", str(paths["noise-b"]))  # version 2 of "skill"
            in_use_at_swap = next(s for s in eng.pack_cache.status() if s.name == "skill").in_use
            new = collect(eng, greedy(PROMPTS[1], NEW_TOKENS, "new", packs=[("skill", 1.0)]))
            rest, new_events = await asyncio.gather(collect_rest(old), new)
            return first + rest, new_events, in_use_at_swap

        async def collect_rest(gen):
            return [ev async for ev in gen]

        old_events, new_events, in_use = run(scenario())
        assert in_use == 1  # the old version was still running when the new one arrived
        check(old_events, oracles((("skill", 1.0),), PROMPTS[1], n))
        check(new_events, oracles((("noise-b", 1.0),), PROMPTS[1]))
        assert eng.pack_cache.stats()["slots_used"] == 1  # the old version's slot is gone
    finally:
        eng.close()


def test_eviction_never_hits_an_in_use_pack(packs, oracles, tiny_tokenizer):
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer, pack_slots=2)
    names = ["skill", "noise-a", "noise-b", "skill", "noise-a", "noise-b"]
    try:
        async def burst():
            return await asyncio.gather(*[collect(eng, greedy(PROMPTS[i % 3], NEW_TOKENS, f"e{i}",
                                                              packs=[(name, 1.0)]))
                                          for i, name in enumerate(names)])

        for i, (name, events) in enumerate(zip(names, run(burst()))):
            check(events, oracles(((name, 1.0),), PROMPTS[i % 3]))
        assert eng.pack_cache.stats()["evictions"] >= 1  # three packs through two slots
    finally:
        eng.close()


def test_queue_bound_returns_429_while_packs_wait_for_a_slot(packs, oracles, tiny_tokenizer):
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer, pack_slots=1, max_queue=1)
    try:
        async def scenario():
            holder = eng.generate(greedy(PROMPTS[0], 30, "h", packs=[("skill", 1.0)]))
            await holder.__anext__()  # "skill" holds the only slot
            waiting = asyncio.ensure_future(collect(eng, greedy(PROMPTS[1], NEW_TOKENS, "w",
                                                                packs=[("noise-a", 1.0)])))
            for _ in range(200):
                if eng.stats()["packs"].get("noise-a", {}).get("waiting") == 1:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(DomainError) as e:
                await collect(eng, greedy(PROMPTS[2], 2, "x", packs=[("noise-b", 1.0)]))
            await holder.aclose()
            return e.value, await waiting

        error, waited = run(scenario())
        assert status_of(error) == 429 and "max_queue=1" in str(error)
        check(waited, oracles((("noise-a", 1.0),), PROMPTS[1]))
    finally:
        eng.close()


def test_running_rows_keep_stepping_while_a_cold_pack_is_read(packs, oracles, tiny_tokenizer):
    """A request whose pack is not on the device waits for it off the engine thread: the rows
    already running produce tokens while the pack file is being read, and then it is served."""
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer)
    reading, release = threading.Event(), threading.Event()
    read = eng.pack_cache._reader

    def slow_reader(path, verify_checksum=True):
        reading.set()
        assert release.wait(timeout=60)
        return read(path, verify_checksum=verify_checksum)

    eng.pack_cache._reader = slow_reader
    try:
        async def scenario():
            runner = eng.generate(greedy(PROMPTS[0], 40, "run"))
            first = [await runner.__anext__()]
            cold = asyncio.ensure_future(collect(eng, greedy(PROMPTS[1], NEW_TOKENS, "cold",
                                                             packs=[("noise-a", 1.0)])))
            while not reading.is_set():
                first.append(await runner.__anext__())
            during = []
            for _ in range(5):  # with the read on the engine thread, none of these could come
                during.append(await asyncio.wait_for(runner.__anext__(), timeout=30))
            release.set()
            rest = [ev async for ev in runner]
            return first + during + rest, await cold

        events, cold = run(scenario())
        assert len([e for e in events if not e.is_prompt]) == 40
        check(cold, oracles((("noise-a", 1.0),), PROMPTS[1]))
    finally:
        release.set()
        eng.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_burst_on_cuda(packs, oracles, tiny_tokenizer, dtype):
    """The burst on a CUDA device (Triton kernels, cuSPARSE): fp32 must match the merged
    models (TF32 dots in the kernels allow a looser bound); bf16 must stay close on the
    first token, where both share the same prefix."""
    pair, fp, paths = packs
    eng = make_engine(pair, fp, paths, tiny_tokenizer, device="cuda", dtype=dtype)
    mixes = [(), (("skill", 1.0),), (("noise-a", 1.0),), (("noise-b", 1.0),), (("skill", 0.5), ("noise-a", 0.5))]
    jobs = [(mix, prompt) for prompt in PROMPTS for mix in mixes]
    try:
        async def burst():
            return await asyncio.gather(*[collect(eng, greedy(p, NEW_TOKENS, f"g{i}", packs=mix))
                                          for i, (mix, p) in enumerate(jobs)])

        for (mix, prompt), events in zip(jobs, run(burst())):
            tokens, logprobs = oracles(mix, prompt)
            if dtype == "float32":
                assert [e.token_id for e in events] == tokens
                torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                                           atol=2e-3, rtol=0)
            else:
                assert abs(events[0].logprob - logprobs[0]) < 0.15
    finally:
        eng.close()
