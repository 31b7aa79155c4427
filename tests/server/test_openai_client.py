"""The official `openai` client, unchanged, against a real uvicorn on 127.0.0.1 with the real engine."""
import openai
import pytest

from tests.server.test_api_common import live_server, settings_for


@pytest.fixture(scope="module")
def api(llama, packs_dir):
    with live_server(settings_for(llama, packs_dir, api_key="client-key-1234")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="client-key-1234", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(api):
    return next(m.id for m in api.models.list().data if getattr(m, "parent", None) is None)


def test_models(api, base_id):
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == {base_id, "skill", "skill2x"}
    assert api.models.retrieve("skill").parent == base_id
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("ghost")


def test_completions(api, base_id):
    out = api.completions.create(model="skill", prompt="3 plus 4 is", max_tokens=5, temperature=0, logprobs=2)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 5
    assert "".join(out.choices[0].logprobs.tokens) == out.choices[0].text


def test_chat_and_streaming(api, base_id):
    messages = [{"role": "user", "content": "3 plus 4 is"}]
    whole = api.chat.completions.create(model=base_id, messages=messages, max_tokens=6, temperature=0)
    chunks = list(api.chat.completions.create(model=base_id, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completions(api, base_id):
    chunks = list(api.completions.create(model=base_id, prompt="def f(x):", max_tokens=4, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_pack_mix_through_extra_body(api, base_id):
    out = api.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                      extra_body={"skillpacks": [{"name": "skill", "weight": 0.5},
                                                                 {"name": "skill2x", "weight": 0.25}]})
    assert out.choices[0].message.role == "assistant"


def test_errors_map_to_the_client_exceptions(api, base_id):
    with pytest.raises(openai.NotFoundError, match="ghost"):
        api.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "hi"}], n=0)
    assert info.value.param == "n"
    bad = openai.OpenAI(base_url=api.base_url, api_key="wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.slow
def test_default_base_answers_through_the_client(tmp_path):
    """The real default base (SmolLM2-135M-Instruct) behind uvicorn, asked a fact (run by hand)."""
    from skillpack_server.settings import Settings
    from skillpacks.default_base import default_base_dir

    settings = Settings(base=default_base_dir(), packs=tmp_path, admin_token="slow-test-token", device="cpu")
    with live_server(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        out = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content


def test_batched_prompts_and_n_through_the_sdk(api, base_id):
    out = api.completions.create(model=base_id, prompt=["def f(x):", "import os"], n=2, max_tokens=4,
                                 temperature=1.0, seed=9)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    lone = api.completions.create(model=base_id, prompt="import os", max_tokens=4, temperature=1.0, seed=10)
    assert out.choices[3].text == lone.choices[0].text  # prompt 1, choice 1: seed + 1


def test_streaming_several_choices_through_the_sdk(api, base_id):
    body = dict(model=base_id, messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=5, temperature=1.0,
                seed=4)
    whole = api.chat.completions.create(**body)
    texts, reasons = {}, {}
    for chunk in api.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
