"""Several prompts, `n` and `best_of` in one request, as the published API shapes them: one
choice per prompt and per n, `index` = prompt x n order, usage summed, streams interleaved by
index. The oracle is each prompt sent alone (same seed per choice), and transformers' logprobs."""
from __future__ import annotations

from collections import defaultdict

import pytest

from tests.server.test_api_common import parse_sse

PROMPTS = ["def wrap(text, width):", "import os\n", "class Stack:"]


@pytest.fixture(scope="module")
def base_id(client):
    return client.app.state.engine.model_id


def post(client, route, body):
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def alone(client, base_id, prompt, **body):
    return post(client, "/v1/completions", {"model": base_id, "prompt": prompt} | body)["choices"]


def test_a_list_of_prompts_answers_each_as_if_alone(client, base_id):
    tok = client.app.state.engine.tokenizer
    for prompts in (PROMPTS, [tok.encode(p) for p in PROMPTS]):  # strings, then token-id lists
        out = post(client, "/v1/completions", {"model": base_id, "prompt": prompts, "max_tokens": 5,
                                               "temperature": 0, "logprobs": 1})
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        for prompt, choice in zip(PROMPTS, out["choices"]):
            single = alone(client, base_id, prompt, max_tokens=5, temperature=0, logprobs=1)[0]
            assert choice["text"] == single["text"] and choice["finish_reason"] == single["finish_reason"]
            assert choice["logprobs"]["tokens"] == single["logprobs"]["tokens"]
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(single["logprobs"]["token_logprobs"], abs=1e-4)
        prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
        assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 15,
                                "total_tokens": prompt_tokens + 15}


def test_n_samples_are_seeded_per_choice_distinct_and_reproducible(client, base_id):
    body = {"model": base_id, "prompt": PROMPTS[:2], "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 11}
    first, again = post(client, "/v1/completions", body), post(client, "/v1/completions", body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == list(range(6))
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts[:3])) == 3 and len(set(texts[3:])) == 3  # distinct samples per prompt
    # choice j of a prompt is the one a lone request with seed + j draws
    for p, prompt in enumerate(PROMPTS[:2]):
        for j in range(3):
            single = alone(client, base_id, prompt, max_tokens=8, temperature=1.0, seed=11 + j)[0]
            assert texts[p * 3 + j] == single["text"]
    assert first["usage"]["completion_tokens"] == 6 * 8


def test_best_of_keeps_the_candidates_with_the_highest_summed_logprob(client, base_id):
    body = {"model": base_id, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 5}
    candidates = post(client, "/v1/completions", body | {"n": 4, "logprobs": 0})["choices"]
    score = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in candidates}
    best = post(client, "/v1/completions", body | {"n": 2, "best_of": 4})
    want = sorted(score, key=score.get, reverse=True)[:2]
    assert [c["text"] for c in best["choices"]] == want and [c["index"] for c in best["choices"]] == [0, 1]
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == 4 * 6  # every candidate's tokens count


def test_streams_interleave_choices_by_index(client, base_id):
    body = {"model": base_id, "prompt": PROMPTS[:2], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 3,
            "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    events = [e for e in parse_sse(r.text) if e != "[DONE]"]
    whole = post(client, "/v1/completions", body | {"stream": False, "stream_options": None})
    texts, finished = defaultdict(str), {}
    for e in events[:-1]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert [texts[c["index"]] for c in whole["choices"]] == [c["text"] for c in whole["choices"]]
    assert finished == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_echo_per_prompt(client, base_id):
    out = post(client, "/v1/completions", {"model": base_id, "prompt": PROMPTS[:2], "max_tokens": 0, "echo": True,
                                           "logprobs": 0})
    assert [c["text"] for c in out["choices"]] == PROMPTS[:2]
    assert all(c["logprobs"]["token_logprobs"][0] is None for c in out["choices"])


def test_chat_n_choices(client, base_id):
    body = {"model": base_id, "messages": [{"role": "user", "content": "hello"}], "n": 3, "max_tokens": 6,
            "temperature": 1.0, "seed": 2}
    out = post(client, "/v1/chat/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in out["choices"]}) == 3
    single = post(client, "/v1/chat/completions", body | {"n": 1, "seed": 4})
    assert out["choices"][2]["message"]["content"] == single["choices"][0]["message"]["content"]
    chunks = [e for e in parse_sse(client.post("/v1/chat/completions", json=body | {"stream": True}).text)
              if e != "[DONE]"]
    streamed = defaultdict(str)
    for c in chunks:
        streamed[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content") or ""
    assert [streamed[i] for i in range(3)] == [c["message"]["content"] for c in out["choices"]]
    scored = post(client, "/v1/chat/completions", body | {"logprobs": True})
    assert scored["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in scored["choices"])
