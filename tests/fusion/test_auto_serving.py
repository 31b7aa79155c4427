"""`model: "auto"` served: routed answers equal the chosen pack's own answers, the response
names the packs (field + header), thresholds fall back to the base, top-k fuses, and the
router follows the pack store: stale on add/replace/delete, rebuilt with a new version,
a deleted pack never chosen again."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from skillpack_server.engine.engine import Engine
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.pack_selection import PackSelector, parse_auto_model, runtime_feature_fn
from skillpack_server.settings import EngineSettings, PackSelectionSettings
from skillpacks.classifier import CLASSIFIER_FILE, load_classifier
from tests.fusion.conftest import write_pack_with_examples
from tests.server.test_api_common import serve, settings_for
from tests.server.test_runtime import noise_delta


@pytest.fixture
def packs_copy(fusion, built_router, tmp_path):
    folder = tmp_path / "packs"
    shutil.copytree(fusion.packs_dir, folder)
    return folder


def chat(client, model, prompt, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
            "temperature": 0} | extra
    return client.post("/v1/chat/completions", json=body)


def test_auto_answers_like_the_chosen_pack_and_names_it(fusion, packs_copy):
    with serve(settings_for(fusion.pair, packs_copy)) as client:
        base_id = client.app.state.engine.model_id
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert listed["auto"]["parent"] == base_id and client.get("/v1/models/auto").json()["id"] == "auto"
        routed = correct = 0
        for name, prompts in fusion.held_out.items():
            for prompt in prompts[:4]:
                r = chat(client, "auto", prompt)
                assert r.status_code == 200, r.text
                body = r.json()
                field = body["skillpack_routing"]
                chosen = [p["name"] for p in field["packs"]]
                assert r.headers["X-SkillPack-Packs"] == ",".join(chosen)
                assert body["model"] == (",".join(chosen) or base_id)  # what served it, not "auto"
                assert field["router_version"] == 1 and not field["stale"]
                if field["fallback"] == "out_of_distribution":
                    assert field["confidence"] is None and chosen == []
                assert abs(sum(field["probabilities"].values()) - 1) < 1e-5
                routed += 1
                correct += chosen == [name]
                direct = chat(client, chosen[0] if chosen else client.app.state.engine.model_id, prompt).json()
                assert body["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert correct >= routed - 1, f"{correct}/{routed} held-out prompts routed to their own pack"
        # completions take raw text: the router knows that rendering too
        prompt = fusion.held_out["sql"][0]
        r = client.post("/v1/completions", json={"model": "auto", "prompt": prompt, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.headers["X-SkillPack-Packs"] == "sql", r.text
        direct = client.post("/v1/completions", json={"model": "sql", "prompt": prompt, "max_tokens": 3,
                                                        "temperature": 0}).json()
        assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
        assert r.json()["skillpack_routing"]["packs"] == [{"name": "sql", "weight": 1.0}]


def test_streamed_auto_answer_carries_header_and_field(fusion, packs_copy):
    prompt = fusion.held_out["json"][1]
    with serve(settings_for(fusion.pair, packs_copy)) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3,
                "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["X-SkillPack-Packs"] == "json"
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks[0]["skillpack_routing"]["packs"][0]["name"] == "json"


def test_top_k_fuses_the_k_most_probable_packs(fusion, packs_copy):
    prompt = fusion.held_out["arith"][2]
    with serve(settings_for(fusion.pair, packs_copy)) as client:
        r = chat(client, "auto:2", prompt, max_tokens=5)
        assert r.status_code == 200, r.text
        field = r.json()["skillpack_routing"]
        probs = field["probabilities"]
        top2 = sorted(probs, key=probs.get, reverse=True)[:2]
        assert [p["name"] for p in field["packs"]] == top2
        assert r.headers["X-SkillPack-Packs"] == ",".join(top2)
        weights = [p["weight"] for p in field["packs"]]
        assert abs(weights[0] - probs[top2[0]] / (probs[top2[0]] + probs[top2[1]])) < 1e-5
        mix = chat(client, client.app.state.engine.model_id, prompt, max_tokens=5, skillpacks=field["packs"])
        assert r.json()["choices"][0]["message"]["content"] == mix.json()["choices"][0]["message"]["content"]


def test_low_confidence_falls_back_to_the_base(fusion, packs_copy, monkeypatch):
    monkeypatch.setenv("SKILLPACK_ROUTER_MIN_CONFIDENCE", "1.0")  # nothing is that sure
    prompt = fusion.held_out["sql"][3]
    with serve(settings_for(fusion.pair, packs_copy)) as client:
        r = chat(client, "auto", prompt)
        base = chat(client, client.app.state.engine.model_id, prompt)
    assert r.status_code == 200 and r.headers["X-SkillPack-Packs"] == ""
    assert r.json()["skillpack_routing"]["packs"] == [] and r.json()["skillpack_routing"]["fallback"] == "low_confidence"
    assert r.json()["choices"][0]["message"]["content"] == base.json()["choices"][0]["message"]["content"]


def test_auto_request_errors(fusion, packs_copy, tmp_path):
    with serve(settings_for(fusion.pair, packs_copy)) as client:
        r = chat(client, "auto", "hi", skillpacks=[{"name": "sql", "weight": 1.0}])
        assert r.status_code == 400 and "cannot be combined with `model: auto`" in r.json()["error"]["message"]
        for bad in ("auto:0", "auto:x", "auto:9"):
            r = chat(client, bad, "hi")
            assert r.status_code == 400 and "`auto:K` with K in 1..8" in r.json()["error"]["message"]
        r = chat(client, client.app.state.engine.model_id, "hi", skillpacks=[{"name": "sql", "weight": 5.0}])
        assert r.status_code == 400 and "finite number in [-4, 4], got 5.0" in r.json()["error"]["message"]
        r = chat(client, client.app.state.engine.model_id, "hi", skillpacks=[{"name": "nope", "weight": 1.0}])
        assert r.status_code == 404 and "`nope` does not exist" in r.json()["error"]["message"]
    empty = tmp_path / "bare"
    empty.mkdir()
    shutil.copy(packs_copy / "sql.skillpack", empty)
    with serve(settings_for(fusion.pair, empty)) as client:
        r = chat(client, "auto", "hi")
    assert r.status_code == 503 and r.json()["error"]["code"] == "router_unavailable"
    assert "skillpack router build" in r.json()["error"]["message"]


def test_parse_auto_model():
    assert parse_auto_model("auto") == 0 and parse_auto_model("auto:3") == 3
    assert parse_auto_model("sql") is None and parse_auto_model("autoX") is None
    with pytest.raises(DomainError, match="auto:K"):
        parse_auto_model("auto:")


def test_router_follows_the_pack_store(fusion, packs_copy, tiny_tokenizer):
    eng = Engine(fusion.pair.base, EngineSettings(device="cpu", max_batch=4, max_model_len=48, page_size=4,
                                                  max_step_tokens=32, pack_slots=4),
                 tokenizer=tiny_tokenizer, fingerprint=fusion.fingerprint)
    try:
        for name in ("arith", "json", "sql"):
            eng.pack_cache.register(name, str(packs_copy / f"{name}.skillpack"))
        auto = PackSelector([packs_copy], eng.pack_cache, tiny_tokenizer, runtime_feature_fn(eng.model),
                          fusion.fingerprint["weights_sha256"], PackSelectionSettings(auto_rebuild=False))
        auto.reload()
        assert auto.status()["state"] == "fresh" and auto.status()["version"] == 1
        ids = lambda p: tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        sql_prompts = [ids(p) for p in fusion.held_out["sql"][:6]]
        assert all(auto.select(p).packs[0][0] == "sql" for p in sql_prompts)

        # delete sql: stale, and its prompts never reach it (its mass is not handed on)
        eng.pack_cache.unregister("sql")
        (packs_copy / "sql.skillpack").unlink()
        assert auto.status()["stale_reasons"] == ["pack `sql` was removed"]
        for p in sql_prompts:
            d = auto.select(p)
            assert "sql" not in [n for n, _ in d.packs] and "sql" not in d.probabilities and d.stale
        assert auto.rebuild().labels == ["arith", "json"]
        assert auto.status() | {"error": None} == {"state": "fresh", "version": 2, "labels": ["arith", "json"],
                                                   "stale_reasons": [], "rebuilding": False, "error": None}

        # add a pack (the background rebuild picks it up) and replace another
        auto.settings = PackSelectionSettings(auto_rebuild=True)
        new_sql = write_pack_with_examples(packs_copy, "sql", fusion.pair.base, fusion.dense["sql"],
                                           fusion.fingerprint, "sql")
        eng.pack_cache.register("sql", str(new_sql))
        other = {n: 2 * d for n, d in noise_delta(fusion.dense["arith"], 5).items()}
        write_pack_with_examples(packs_copy, "arith", fusion.pair.base, other, fusion.fingerprint, "arithmetic")
        eng.pack_cache.register("arith", str(packs_copy / "arith.skillpack"))
        assert auto.stale_reasons() == ["pack `sql` was added", "pack `arith` changed"]
        auto.select(sql_prompts[0])  # answers with version 2 and starts the rebuild
        auto.wait_for_rebuild(timeout=300)
        assert auto.status()["state"] == "fresh" and auto.status()["version"] == 3
        assert load_classifier(packs_copy / CLASSIFIER_FILE).manifest["version"] == 3  # written next to the packs
        assert sum(auto.select(p).packs[:1] == [("sql", 1.0)] for p in sql_prompts) >= 5

        # a router built for another base is never used
        auto.base_weights_sha256 = "0" * 64
        auto.reload()
        assert auto.classifier is None and "another base" in auto.last_error
        with pytest.raises(DomainError) as e:
            auto.select(sql_prompts[0])
        assert status_of(e.value) == 503
    finally:
        eng.close()
