"""`POST /v1/chat/completions` on the real engine: the chat template, content forms, roles,
token limits, logprobs with bytes, the streaming chunk order, and refused fields."""
import pytest

from tests.server.test_api_common import parse_sse
from tests.server.test_api_completions import straddling_stop

MESSAGES = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "3 plus 4 is"}]


@pytest.fixture(scope="module")
def base_id(client):
    return client.app.state.engine.model_id


def chat(client, **body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_is_the_chat_template_with_generation_prompt(client, base_id):
    tok = client.app.state.engine.tokenizer
    want = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)
    out = chat(client, model=base_id, messages=MESSAGES, max_tokens=4, temperature=0)
    assert out["usage"]["prompt_tokens"] == len(want)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None


def test_content_parts_and_developer_role_mean_the_same(client, base_id):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You add "}, {"type": "text", "text": "numbers."}]},
             {"role": "user", "content": [{"type": "text", "text": "3 plus 4 is"}]}]
    a = chat(client, model=base_id, messages=MESSAGES, max_tokens=6, temperature=0)
    b = chat(client, model=base_id, messages=parts, max_tokens=6, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_assistant_turns_are_part_of_the_prompt(client, base_id):
    convo = MESSAGES + [{"role": "assistant", "content": "7."}, {"role": "user", "content": "and 5 plus 1?"}]
    assert chat(client, model=base_id, messages=convo, max_tokens=1)["usage"]["prompt_tokens"] > \
        chat(client, model=base_id, messages=MESSAGES, max_tokens=1)["usage"]["prompt_tokens"]


def test_max_completion_tokens_wins_over_max_tokens(client, base_id):
    out = chat(client, model=base_id, messages=MESSAGES, max_tokens=9, max_completion_tokens=2,
               temperature=0, stop=None)
    assert out["usage"]["completion_tokens"] <= 2


def test_logprobs_with_bytes_and_top_alternatives(client, base_id):
    out = chat(client, model=base_id, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    raw = b"".join(bytes(e["bytes"]) for e in content)
    assert raw.decode("utf-8", "replace").startswith(choice["message"]["content"])
    for e in content:
        assert len(e["top_logprobs"]) == 3
        assert e["logprob"] == pytest.approx(max(t["logprob"] for t in e["top_logprobs"]))
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted((t["logprob"] for t in e["top_logprobs"]), reverse=True)


def test_logprobs_without_top(client, base_id):
    out = chat(client, model=base_id, messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in out["choices"][0]["logprobs"]["content"])


def test_stream_sends_role_then_content_then_finish(client, base_id):
    body = dict(model=base_id, messages=MESSAGES, max_tokens=6, temperature=0)
    whole = chat(client, **body)
    plain = whole["choices"][0]
    r = client.post("/v1/chat/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    middle = chunks[1:-1]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == plain["message"]["content"]


def test_stop_strings_apply_to_chat(client):
    # a seeded sample: varied text (greedy chat on the tiny model repeats one character), and
    # the same draws up to the stop string
    body = dict(model="skill", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7)
    free = chat(client, **body, logprobs=True)["choices"][0]
    tokens = [e["token"] for e in free["logprobs"]["content"]]
    stop = straddling_stop(tokens)
    text = free["message"]["content"]
    out = chat(client, **body, stop=stop)
    assert out["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field, value, param", [
    ("tools", [{"type": "custom", "custom": {"name": "f"}}], "tools.0"),
    ("tools", [{"type": "function", "function": {"name": "bad name"}}], "tools.0.function.name"),
    ("tool_choice", "auto", "tool_choice"), ("tool_choice", {"type": "function", "function": {"name": "g"}}, "tool_choice"),
    ("functions", [{"name": "f"}, {"name": "f"}], "functions"), ("function_call", "auto", "function_call"),
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("response_format", {"type": "json_schema"}, "response_format"),
    ("n", 0, "n"), ("n", 65, "n"), ("top_logprobs", 2, "top_logprobs"), ("audio", {"voice": "x"}, "audio"),
    ("modalities", ["text", "audio"], "modalities"), ("frequency_penalty", 3.0, "frequency_penalty"),
    ("max_tokens", 0, "max_tokens"), ("max_completion_tokens", -3, "max_completion_tokens"), ("messages", [], "messages"),
    ("temperature", 9, "temperature"), ("store", True, "store"), ("metadata", {"a": "b"}, "metadata"),
    ("service_tier", "flex", "service_tier"), ("reasoning_effort", "low", "reasoning_effort"),
    ("logit_bias", {"abc": 1}, "logit_bias"), ("logit_bias", {"5": 101}, "logit_bias"),
    ("min_tokens", 99, None), ("some_new_field", 1, "some_new_field"),
])
def test_unsupported_or_bad_fields_are_refused_by_name(client, base_id, field, value, param):
    body = {"model": base_id, "messages": MESSAGES, field: value} | ({"max_tokens": 4} if field == "min_tokens" else {})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and field in err["message"], err
    if field == "some_new_field":
        assert err["message"] == "Unrecognized request argument supplied: some_new_field"


def test_response_format_text_is_accepted(client, base_id):
    chat(client, model=base_id, messages=MESSAGES, max_tokens=1, response_format={"type": "text"})


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content"),
    ([{"role": "tool", "content": "x"}], "messages.0.tool_call_id"),
    ([{"role": "critic", "content": "x"}], "messages.0.role"),
    ([{"role": "user", "content": None}], "messages.0.content"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages.0.tool_call_id"),
    ([{"content": "x"}], "messages.0.role"),
])
def test_bad_messages_name_the_field(client, base_id, messages, param):
    r = client.post("/v1/chat/completions", json={"model": base_id, "messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
