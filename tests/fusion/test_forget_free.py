"""Forget-free continual learning: adding, replacing or deleting a pack leaves every other
pack's (and the base's) greedy tokens, logprobs and top-logprobs bit-identical; deleting
a pack removes its behaviour. Requests run one at a time so each step's batch is the same
before and after the change; two pack slots make the changes move packs between slots.

A fused row (two packs in one row) keeps its tokens but only matches to float rounding:
the runtime sums the packs' norm, bias and embedding deltas in slot order, and a pack
reloaded into another slot changes that order (docs/FUSION.md).
"""
from __future__ import annotations

import pytest

import torch

from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from tests.fusion.conftest import write_pack_with_examples
from tests.fusion.test_fusion_engine import make_engine
from tests.server.test_engine import collect, greedy, run
from tests.server.test_runtime import noise_delta

PROMPTS = [[5, 17, 99, 3, 250, 11, 7, 42], [8, 9, 10], [300, 2, 77, 77, 120]]
NEW_TOKENS = 5


def outputs(engine, mixes) -> dict:
    """Every (mix, prompt)'s exact events: token ids, logprobs and top-3 alternatives."""
    out = {}
    for mix in mixes:
        for i, prompt in enumerate(PROMPTS):
            events = run(collect(engine, greedy(prompt, NEW_TOKENS, f"p{i}", packs=mix, logprobs=3)))
            out[(mix, i)] = [(e.token_id, e.logprob, tuple(e.top_logprobs), e.finish_reason) for e in events]
    return out


def check_fused_close(now: dict, before: dict) -> None:
    assert now.keys() == before.keys()
    for key, events in now.items():
        assert [e[0] for e in events] == [e[0] for e in before[key]]
        torch.testing.assert_close(torch.tensor([e[1] for e in events]), torch.tensor([e[1] for e in before[key]]),
                                   atol=1e-5, rtol=0)


def test_adding_replacing_and_deleting_packs_never_changes_the_others(fusion, tiny_tokenizer, tmp_path):
    eng = make_engine(fusion, tiny_tokenizer, names=("arith", "json"), pack_slots=2)
    kept = [(), (("arith", 1.0),)]
    fused = [(("arith", 0.5), ("json", 0.5))]
    try:
        before = outputs(eng, kept + [(("json", 1.0),)])
        fused_before = outputs(eng, fused)
        # add a pack and use it (it takes a slot: arith or json is evicted and reloaded later)
        eng.pack_cache.register("sql", str(fusion.paths["sql"]))
        sql_v1 = outputs(eng, [(("sql", 1.0),)])
        assert outputs(eng, kept + [(("json", 1.0),)]) == before
        check_fused_close(outputs(eng, fused), fused_before)
        # replace it with a different delta: its own outputs change, nobody else's do
        other = {n: 2 * d for n, d in noise_delta(fusion.dense["sql"], 99).items()}
        new_path = write_pack_with_examples(tmp_path, "sql", fusion.pair.base, other, fusion.fingerprint, "sql")
        eng.pack_cache.register("sql", str(new_path))
        sql_v2 = outputs(eng, [(("sql", 1.0),)])
        assert sql_v2 != sql_v1
        assert outputs(eng, kept + [(("json", 1.0),)]) == before
        check_fused_close(outputs(eng, fused), fused_before)
        # delete json: the others stay bit-identical, json itself is gone
        eng.pack_cache.unregister("json")
        after = outputs(eng, kept)
        assert after == {k: v for k, v in before.items() if k[0] in kept}
        for mix in ((("json", 1.0),), fused[0]):
            with pytest.raises(DomainError) as e:
                run(collect(eng, greedy(PROMPTS[0], 2, packs=mix)))
            assert status_of(e.value) == 404 and "json" in str(e.value)
        assert eng.pack_cache.stats()["evictions"] >= 1  # the checks above crossed slot changes
    finally:
        eng.close()
