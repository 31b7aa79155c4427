"""A pack whose values are finite but overflow the activations (it passes verification) must
fail only its own requests, with a clear error, and leave nothing behind for other requests:
no wrong tokens from NaN logits, no NaN K/V read by the next request that reuses the pages."""
from __future__ import annotations

import asyncio

import pytest
import transformers
import torch

from skillpack_kernels.factors import LowRankDelta
from skillpack_server.engine.engine import Engine
from skillpack_server.engine.types import GenerationRequest, SamplingParams
from skillpack_server.exceptions import DomainError
from skillpack_server.settings import EngineSettings
from skillpacks.format import read_pack, verify_pack, write_pack
from tests.server.test_api_common import ADMIN, serve, settings_for
from tests.server.test_engine import collect, greedy_reference

PROMPT = [5, 17, 99, 3, 250, 11, 7, 42]
N = 6


def greedy(prompt, n, rid, packs=(), temperature=0.0):
    return GenerationRequest(rid, list(prompt), list(packs),
                             SamplingParams(max_tokens=n, temperature=temperature, seed=1, logprobs=0,
                                            ignore_eos=True))


@pytest.fixture(scope="module")
def overflowing(pack_paths, tmp_path_factory):
    """The `skill` pack with every singular value times 1e30: finite, ordered, checksummed."""
    pack = read_pack(pack_paths["skill"])
    for delta in pack.deltas.values():
        if isinstance(delta, LowRankDelta):
            delta.s = delta.s * 1e30
    path = tmp_path_factory.mktemp("overflow") / "overflow.skillpack"
    write_pack(path, "overflow", "finite but far too large", pack.manifest["base"], pack.deltas, pack.records, {})
    verify_pack(path)  # the file itself is well formed: only running it shows the fault
    return path


@pytest.fixture(scope="module")
def reference(pair):
    model = transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    return greedy_reference(model, PROMPT, N)


def test_overflowing_pack_fails_alone_and_leaves_no_trace(pair, tiny_tokenizer, overflowing, reference):
    eng = Engine(pair.base, EngineSettings(device="cpu", max_batch=4, max_model_len=48, page_size=4,
                                           max_step_tokens=16), tokenizer=tiny_tokenizer)
    eng.pack_cache.register("overflow", str(overflowing))

    async def guarded(request):
        try:
            return await collect(eng, request)
        except DomainError as e:
            return e

    async def scenario():
        alone = [await guarded(greedy(PROMPT, N, "o1", packs=[("overflow", 1.0)])),
                 await guarded(greedy(PROMPT, N, "o2", packs=[("overflow", 1.0)], temperature=1.0))]
        after = await guarded(greedy(PROMPT, N, "b1"))  # reuses the pages the failed rows wrote
        together = await asyncio.gather(guarded(greedy(PROMPT, N, "o3", packs=[("overflow", 1.0)])),
                                        guarded(greedy(PROMPT, N, "b2")),
                                        guarded(greedy(PROMPT, N, "o4", packs=[("overflow", 1.0)],
                                                       temperature=0.7)))
        return alone, after, together

    try:
        alone, after, together = asyncio.run(scenario())
    finally:
        eng.close()
    for failed in [*alone, together[0], together[2]]:
        assert isinstance(failed, DomainError), failed
        assert "non-finite" in str(failed) and "overflow" in str(failed)
    tokens, logprobs = reference
    for events in (after, together[1]):
        assert not isinstance(events, DomainError), events
        assert [e.token_id for e in events] == tokens
        torch.testing.assert_close(torch.tensor([e.logprob for e in events]), torch.tensor(logprobs),
                                   atol=1e-4, rtol=0)


def test_overflowing_pack_over_http_is_an_error_and_the_server_stays_correct(pair, overflowing, reference,
                                                                             tmp_path):
    with serve(settings_for(pair, tmp_path)) as client:
        assert client.post("/admin/skillpacks", files={"file": ("p", overflowing.read_bytes())},
                           headers=ADMIN).status_code == 201
        base_id = client.app.state.engine.model_id
        for body in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"stream": True}):
            r = client.post("/v1/completions", json={"model": "overflow", "prompt": PROMPT, "max_tokens": N,
                                                     **body})
            assert r.status_code == 500, r.text
            assert "non-finite" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": base_id, "prompt": PROMPT, "max_tokens": N,
                                                 "temperature": 0, "logprobs": 0})
        assert r.status_code == 200
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(reference[1]), atol=1e-4, rtol=0)
        assert client.get("/health").json()["status"] == "ok"
