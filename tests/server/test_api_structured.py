"""Structured output and tool calls through the official `openai` client: `json_schema` replies that
validate against their schema (checked by `jsonschema`, an independent validator), tool calls the
SDK parses, whole and streamed, a tool round trip in the history, and constrained and free rows
sharing one batch. The tiny model's weights are random: only the grammar makes its JSON valid."""
from __future__ import annotations

import copy
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from skillpack_server.routers.chat import render_prompt
from skillpack_server.schemas.chat import ChatRequest
from skillpack_server.structured_output import call_prefix
from skillpack_server.tool_calls import CallStream, call_text, parse_call
from tests.server.test_api_common import live_server, settings_for

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 8},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["answer", "score", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for three days?"}]


@pytest.fixture(scope="module")
def api(llama, tmp_path_factory):
    # the tiny tokenizer spends ~1.5 characters a token on JSON: the tool descriptions alone take
    # 500 tokens, past the tiny config's 512; positions are computed, so a longer limit is the
    # same model
    base = tmp_path_factory.mktemp("base2k") / "base"
    shutil.copytree(llama.base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    settings = settings_for(llama, tmp_path_factory.mktemp("store"), base=base, max_model_len=2048)
    with live_server(settings) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(api):
    return next(m.id for m in api.models.list().data if getattr(m, "parent", None) is None)


def test_json_schema_replies_validate_for_seeded_samples(api, base_id):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        out = api.chat.completions.create(model=base_id, messages=ASK, temperature=1.0, seed=seed, max_tokens=96,
                                          response_format=fmt)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_constrained_and_free_rows_share_a_batch(api, base_id):
    free = dict(model=base_id, messages=ASK, temperature=0, max_tokens=12)
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    alone = api.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(api.chat.completions.create, **free)] + [
            pool.submit(api.chat.completions.create, model=base_id, messages=ASK, temperature=1.0, seed=s,
                        max_tokens=96, n=2, response_format=fmt) for s in range(3)]
        free_out, *constrained = [f.result() for f in futures]
    assert free_out.choices[0].message.content == alone
    for out in constrained:
        for choice in out.choices:
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_replies_are_objects(api, base_id):
    out = api.chat.completions.create(model=base_id, messages=ASK, temperature=1.0, seed=0, max_tokens=48, n=4,
                                      response_format={"type": "json_object"})
    for choice in out.choices:
        text = choice.message.content
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_in_the_sdk(api, base_id, choice):
    for seed in range(5):
        out = api.chat.completions.create(model=base_id, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
                                          temperature=1.0, seed=seed, max_tokens=160)
        c = out.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        names = ["get_weather"] if isinstance(choice, dict) else ["get_weather", "get_time"]
        assert call.function.name in names
        spec = WEATHER if call.function.name == "get_weather" else CLOCK
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_streamed_tool_call_deltas_add_up_to_the_whole_call(api, base_id):
    body = dict(model=base_id, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=3,
                max_tokens=160)
    whole = api.chat.completions.create(**body).choices[0].message.tool_calls[0]
    chunks = list(api.chat.completions.create(**body, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert "".join(tc.function.arguments or "" for tc in calls) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_round_trip_in_the_history(api, base_id):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = api.chat.completions.create(model=base_id, messages=history, tools=[WEATHER], tool_choice="none",
                                      temperature=0, max_tokens=8)
    assert out.choices[0].finish_reason in ("stop", "length") and out.choices[0].message.tool_calls is None


def test_legacy_functions_answer_with_function_call(api, base_id):
    out = api.chat.completions.create(model=base_id, messages=ASK, functions=[WEATHER["function"]],
                                      function_call={"name": "get_weather"}, temperature=0, max_tokens=160)
    c = out.choices[0]
    assert c.finish_reason == "function_call" and c.message.function_call.name == "get_weather"
    json.loads(c.message.function_call.arguments)


@pytest.mark.parametrize("fmt, where", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "response_format.json_schema.name"),
])
def test_unusable_schemas_are_400_naming_the_field(api, base_id, fmt, where):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=base_id, messages=ASK, response_format=fmt, max_tokens=4)
    assert info.value.param == where


# ---- rendering and reading calls, without the model -------------------------------------------

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}"
    "</call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def history_request(**extra) -> ChatRequest:
    return ChatRequest(model="m", messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], tools=[WEATHER], **extra)


def test_a_template_that_knows_tools_gets_them_and_the_calls_as_mappings(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    body = history_request()
    text = tok.decode(render_prompt(tok, body, body.function_definitions))
    assert '"name": "get_weather"' in text and "<call>get_weather {\"city\": \"Paris\", \"days\": 3}</call>" in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text


def test_a_template_without_tools_sees_them_in_the_system_turn_and_calls_as_text(tiny_tokenizer):
    body = history_request()
    text = tiny_tokenizer.decode(render_prompt(tiny_tokenizer, body, body.function_definitions))
    assert text.index("get_weather") < text.index("What is the weather")  # described before the question
    assert call_text("get_weather", '{"city": "Paris", "days": 3}') in text
    bare = tiny_tokenizer.decode(render_prompt(tiny_tokenizer, body, []))  # tool_choice none: not offered
    assert '"description": "The weather in a city."' not in bare


def test_call_stream_reassembles_any_split_of_a_call():
    text = call_text("get_weather", '{"city": "Lyon", "days": 2}')
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream = CallStream(["get_time", "get_weather"])
        events = [e for p in pieces for e in stream.feed(p)] + stream.finish()
        assert events[0] == ("call", "get_weather")
        assert "".join(v for k, v in events if k == "arguments") == '{"city": "Lyon", "days": 2}'
    plain = CallStream(["get_weather"])
    assert plain.feed("Hello") + plain.feed(" there") + plain.finish() == [("content", "Hello"), ("content", " there")]
    assert parse_call(text, ["get_weather"]) == ("get_weather", '{"city": "Lyon", "days": 2}')
    assert parse_call(text[:-3], ["get_weather"]) is None and parse_call(text, ["other"]) is None
    assert call_prefix("a") == '<tool_call>\n{"name": "a", "arguments": '
