"""The HTTP layer's own error behaviour: the OpenAI envelope for routing, validation, body size,
engine refusals (429/503 mapped from EngineOverloaded/EngineUnavailable) and unexpected failures (500, no traceback).

The engine refusals and crashes cannot be provoked on demand in the real engine, so these tests
drive the app with `RefusingEngine`, a stand-in that raises what it is told; everything else here
runs the real engine.
"""
import pytest

from skillpack_server.engine.types import PackStatus
from skillpack_server.exceptions import EngineOverloaded, EngineUnavailable
from tests.server.test_api_common import parse_sse, serve, settings_for


class _NoPacks:
    def status(self) -> list[PackStatus]:
        return []

    def names(self) -> list[str]:
        return []

    def register(self, name, path, verified=False):
        raise AssertionError("the error tests use an empty store")


class RefusingEngine:
    """Raises `error` from generate(), before the first token or after `after` tokens."""

    model_id = "stand-in"
    max_model_len = 64
    model = None  # no runtime model: `model: auto` is unavailable

    def __init__(self, tokenizer, error: BaseException, after: int = 0):
        self.tokenizer, self.error, self.after = tokenizer, error, after
        self.pack_cache = _NoPacks()
        self.base_fingerprint = {}
        self.eos_ids = frozenset()

    async def generate(self, request):
        from skillpack_server.engine.types import TokenEvent

        for i in range(self.after):
            yield TokenEvent(token_id=self.tokenizer.encode("a")[0], logprob=-1.0)
        raise self.error

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def check_envelope(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_unknown_route_and_wrong_method(client):
    check_envelope(client.get("/v1/nothing-here"), 404)
    err = check_envelope(client.delete("/v1/completions"), 405)
    assert "DELETE" in err["message"]


def test_validation_errors_are_400_with_param(client):
    err = check_envelope(client.post("/v1/completions", json={"prompt": "x"}), 400)
    assert err["param"] == "model" and "`model`" in err["message"]
    err = check_envelope(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = check_envelope(client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user"}]}), 400)
    assert err["param"] == "messages.0.content"


def test_body_over_the_limit_is_413(llama, packs_dir):
    with serve(settings_for(llama, packs_dir, max_body_bytes=2048)) as c:
        err = check_envelope(c.post("/v1/completions", json={"model": "m", "prompt": "x" * 5000}), 413)
        assert "2048" in err["message"]

        def chunks():  # no Content-Length: counted while it streams
            yield b'{"model": "m", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        check_envelope(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("refusal, status", [(EngineOverloaded, 429), (EngineUnavailable, 503)])
def test_engine_refusals_keep_their_status(tiny_tokenizer, llama, tmp_path, refusal, status):
    engine = RefusingEngine(tiny_tokenizer, refusal("the queue is full; retry later", code="overloaded"))
    with serve(settings_for(llama, tmp_path), engine_factory=lambda s: engine) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"model": "stand-in", "prompt": "hello", "stream": stream})
            err = check_envelope(r, status)
            assert err["message"] == "the queue is full; retry later" and err["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"


def test_engine_error_mid_stream_is_reported_in_band(tiny_tokenizer, llama, tmp_path):
    engine = RefusingEngine(tiny_tokenizer, EngineUnavailable("evicted"), after=2)
    with serve(settings_for(llama, tmp_path), engine_factory=lambda s: engine) as c:
        r = c.post("/v1/chat/completions", json={"model": "stand-in", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "evicted"


def test_unexpected_failure_is_500_without_traceback(tiny_tokenizer, llama, tmp_path):
    engine = RefusingEngine(tiny_tokenizer, RuntimeError("secret internal detail"))
    with serve(settings_for(llama, tmp_path), engine_factory=lambda s: engine) as c:
        r = c.post("/v1/completions", json={"model": "stand-in", "prompt": "hello"})
        err = check_envelope(r, 500)
        assert "secret" not in r.text and "Traceback" not in r.text and err["type"] == "server_error"
