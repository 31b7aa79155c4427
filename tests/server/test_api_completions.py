"""`POST /v1/completions` on the real engine and the tiny llama base: every prompt form, echo,
logprobs (against transformers' own log-softmax), stop strings, streaming and the bounds."""
import math

import pytest

from tests.server.test_api_common import parse_sse, reference_logprobs

PROMPT = "def wrap(text, width):"


@pytest.fixture(scope="module")
def base_id(client):
    return client.app.state.engine.model_id


@pytest.fixture(scope="module")
def tokenizer(client):
    return client.app.state.engine.tokenizer


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_prompt_form_gives_the_same_greedy_text(client, base_id, tokenizer):
    ids = tokenizer.encode(PROMPT)
    forms = [PROMPT, [PROMPT], ids, [ids]]
    outs = [complete(client, model=base_id, prompt=p, max_tokens=6, temperature=0) for p in forms]
    texts = {o["choices"][0]["text"] for o in outs}
    assert len(texts) == 1 and outs[0]["choices"][0]["text"]
    for o in outs:
        assert o["object"] == "text_completion" and o["model"] == base_id
        assert o["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
        assert o["choices"][0]["finish_reason"] == "length"


def test_echo_with_zero_tokens_scores_the_prompt_like_transformers(client, base_id, tokenizer, llama):
    ids = tokenizer.encode(PROMPT)
    out = complete(client, model=base_id, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = reference_logprobs(llama.base, ids)
    got = lp["token_logprobs"][1:]
    assert max(abs(g - w) for g, w in zip(got, want.tolist())) < 1e-3
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert "".join(lp["tokens"]) == PROMPT
    for top, token, value in zip(lp["top_logprobs"][1:], lp["tokens"][1:], got):
        assert token in top and top[token] == pytest.approx(value) and len(top) <= 3
    assert out["usage"]["completion_tokens"] == 0


def test_echo_without_logprobs_and_zero_tokens(client, base_id):
    out = complete(client, model=base_id, prompt=PROMPT, max_tokens=0, echo=True)
    assert out["choices"][0]["text"] == PROMPT and out["choices"][0]["logprobs"] is None


def test_generated_logprobs_are_consistent_and_greedy_picks_the_top(client, base_id):
    out = complete(client, model=base_id, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert len(lp["tokens"]) == 5 and lp["text_offset"][0] == 0
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and math.isfinite(value)
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))


def test_echo_logprobs_cover_prompt_then_completion(client, base_id, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = complete(client, model=base_id, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == len(ids) + 3
    assert lp["text_offset"][len(ids)] == len(PROMPT)


def straddling_stop(tokens: list[str]) -> str:
    """A stop string that starts inside one generated token and ends inside the next."""
    for here, after in zip(tokens, tokens[1:]):
        if len(here) >= 2 and after:
            return here[-1] + after[0]
    pytest.fail(f"no multi-character token to place a stop string across: {tokens}")


def test_stop_string_split_across_tokens_cuts_the_text(client):
    body = dict(model="skill", prompt="The quick", max_tokens=12, temperature=0)
    free = complete(client, **body, logprobs=0)["choices"][0]
    stop = straddling_stop(free["logprobs"]["tokens"])
    cut = free["text"][: free["text"].index(stop)]
    out = complete(client, **body, stop=[stop, "never-said"])
    assert out["choices"][0]["text"] == cut and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 12
    stream = client.post("/v1/completions", json=body | {"stop": stop, "stream": True})
    chunks = [e for e in parse_sse(stream.text) if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streaming_matches_the_plain_response(client, base_id):
    body = dict(model=base_id, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    plain = complete(client, **body)["choices"][0]
    r = client.post("/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    streamed_tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed_tokens == plain["logprobs"]["tokens"]
    assert len({c["id"] for c in chunks}) == 1


def test_streaming_echo(client, base_id):
    r = client.post("/v1/completions", json=dict(model=base_id, prompt=PROMPT, max_tokens=2, echo=True, stream=True))
    chunks = [e for e in parse_sse(r.text) if e != "[DONE]"]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert all("usage" not in c for c in chunks)


def test_same_seed_same_sample(client, base_id):
    body = dict(model=base_id, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    assert complete(client, **body)["choices"][0]["text"] == complete(client, **body)["choices"][0]["text"]


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 65), ("best_of", 0), ("suffix", "x"), ("logit_bias", {"x": 2}), ("presence_penalty", 2.5),
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("logprobs", 6),
    ("max_tokens", -1), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", 3), ("prompt", ""),
    ("prompt", ["a", ""]), ("prompt", [[1, 2], []]), ("prompt", [1, "a"]), ("prompt", {"a": 1}),
    ("prompt", ["a"] * 65), ("seed", 2**70), ("stream_options", {"include_usage": True}),
    ("stop_token_ids", list(range(65))), ("min_tokens", -1),
])
def test_bad_fields_are_refused_by_name(client, base_id, field, value):
    r = client.post("/v1/completions", json={"model": base_id, "prompt": "hi", field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error"


def test_context_bounds(client, base_id, tokenizer):
    limit = client.app.state.engine.max_model_len
    r = client.post("/v1/completions", json={"model": base_id, "prompt": [5] * (limit + 1)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"model": base_id, "prompt": [5] * 10, "max_tokens": limit})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"model": base_id, "prompt": [len(tokenizer) + 3]})
    assert r.status_code == 400 and str(len(tokenizer) + 3) in r.json()["error"]["message"]


def test_unknown_fields_are_refused_as_openai_does(client, base_id):
    r = client.post("/v1/completions", json={"model": base_id, "prompt": "hi", "some_future_field": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Unrecognized request argument supplied: some_future_field", "type": "invalid_request_error",
        "param": "some_future_field", "code": "invalid_value"}
    # identifiers and cache hints ask nothing of the server: accepted
    out = complete(client, model=base_id, prompt="hi", max_tokens=1, user="u1", safety_identifier="s",
                   prompt_cache_key="k", service_tier="auto", store=False)
    assert out["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("body, why", [
    ({"best_of": 2, "n": 3}, "at least `n`"), ({"best_of": 3, "stream": True}, "cannot be streamed"),
    ({"prompt": ["a"] * 9, "n": 8}, "at most 64"), ({"min_tokens": 20, "max_tokens": 4}, "above the token limit"),
])
def test_choice_counts_are_bounded(client, base_id, body, why):
    r = client.post("/v1/completions", json={"model": base_id, "prompt": "hi"} | body)
    assert r.status_code == 400 and why in r.json()["error"]["message"], r.text


def test_unknown_model_is_a_404_naming_it(client):
    r = client.post("/v1/completions", json={"model": "no-such-pack", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `no-such-pack` does not exist."
