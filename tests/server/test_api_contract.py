"""The API contract itself: the OpenAPI document describes the API as it behaves (security,
upload bodies, 400 not 422, pack-name pattern, /metrics as text), 405 lists every method, a
client that leaves mid-upload is a 499 (not a 5xx, no traceback), a stalled upload is cut off,
and rejections never show the server's temporary paths."""
from __future__ import annotations

import logging
import re
import socket
import time

import httpx
import pytest

from skillpack_server.app import create_app
from tests.server.test_api_common import ADMIN, ADMIN_TOKEN, live_server, settings_for


def openapi(llama, tmp_path, **overrides) -> dict:
    return create_app(settings_for(llama, tmp_path, **overrides)).openapi()


def test_the_document_declares_security_bodies_errors_and_names(llama, tmp_path):
    doc = openapi(llama, tmp_path, api_key="inference-key-1")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["AdminToken"]["scheme"] == "bearer" and schemes["ApiKey"]["scheme"] == "bearer"
    paths = doc["paths"]
    assert paths["/admin/skillpacks"]["post"]["security"] == [{"AdminToken": []}]
    assert paths["/v1/chat/completions"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in paths["/health"]["get"]
    upload = paths["/admin/skillpacks"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file"] and upload["properties"]["file"]["format"] == "binary"
    assert set(upload["properties"]) == {"file", "name", "replace", "examples"}
    assert "text/plain" in paths["/admin/skillpacks/{name}/examples"]["put"]["requestBody"]["content"]
    for path, operations in paths.items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}
            for param in op.get("parameters", []):
                if param["name"] == "name":
                    assert param["schema"]["minLength"] == 1 and re.match(param["schema"]["pattern"], "sql")
                    assert not re.match(param["schema"]["pattern"], "../x")
    assert "409" in paths["/admin/skillpacks"]["post"]["responses"]
    assert "429" in paths["/v1/completions"]["post"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    # without an API key the /v1 routes are open, and the document says so
    open_doc = openapi(llama, tmp_path)
    assert "ApiKey" not in open_doc["components"]["securitySchemes"]
    assert "security" not in open_doc["paths"]["/v1/completions"]["post"]


def test_405_lists_every_method_of_the_path(client):
    r = client.patch("/admin/skillpacks/skill", headers=ADMIN)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    assert "DELETE, GET" in r.json()["error"]["message"]
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def raw_upload(port: int, head_only_body: bytes, declared: int) -> socket.socket:
    """A multipart upload that declares `declared` bytes but sends only `head_only_body`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /admin/skillpacks HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {declared}\r\n".encode()
                 + b"Content-Type: multipart/form-data; boundary=BOUND\r\n\r\n" + head_only_body)
    return sock


PART = b'--BOUND\r\nContent-Disposition: form-data; name="file"; filename="p.skillpack"\r\n\r\n' + b"x" * 5000


def metric_lines(url: str, route: str) -> list[str]:
    text = httpx.get(f"{url}/metrics").text
    return [line for line in text.splitlines() if line.startswith("skillpack_http_requests_total") and route in line]


def test_a_client_leaving_mid_upload_is_499_without_a_traceback(llama, tmp_path, caplog):
    store = tmp_path / "store"
    with caplog.at_level(logging.INFO), live_server(settings_for(llama, store)) as url:
        port = int(url.rsplit(":", 1)[1])
        raw_upload(port, PART, 1_000_000).close()
        deadline = time.monotonic() + 30
        while not any('status="499"' in line for line in metric_lines(url, '"/admin/skillpacks"')):
            assert time.monotonic() < deadline, metric_lines(url, "/admin/skillpacks")
            time.sleep(0.1)
        assert not any('status="5' in line for line in metric_lines(url, "/admin/skillpacks"))
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [p.name for p in store.iterdir()] == []  # the temporary file went with it


def test_a_stalled_upload_is_cut_off_and_leaves_nothing(llama, tmp_path):
    store = tmp_path / "store"
    with live_server(settings_for(llama, store, upload_read_timeout=0.5)) as url:
        sock = raw_upload(int(url.rsplit(":", 1)[1]), PART, 1_000_000)
        answer = sock.recv(65536).decode(errors="replace")
        sock.close()
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "upload_stalled" in answer
    assert [p.name for p in store.iterdir()] == []


def test_rejections_do_not_show_temporary_paths(client, packs_dir):
    r = client.post("/admin/skillpacks", files={"file": ("p.skillpack", b"\x08" + b"\0" * 200)},
                    data={"name": "junk"}, headers=ADMIN)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert str(packs_dir) not in message and ".upload-" not in message, message
    r = client.post("/admin/skillpacks", files={"file": ("p.skillpack", b"")}, data={"name": "e"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_upload"


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_extension_fields_are_honoured_not_dropped(client, route):
    base = client.app.state.engine.model_id
    body = {"model": base, "temperature": 0, "max_tokens": 6, "logprobs": 1 if route == "/v1/completions" else True}
    body |= {"prompt": "def f(x):"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    first = client.post(route, json=body).json()
    tokens = (first["choices"][0]["logprobs"]["tokens"] if route == "/v1/completions"
              else [t["token"] for t in first["choices"][0]["logprobs"]["content"]])
    tokenizer = client.app.state.engine.tokenizer
    stop_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(tokens[1])[0]) if tokens[1].strip() else None
    if stop_id is not None:
        stopped = client.post(route, json=body | {"stop_token_ids": [stop_id]}).json()
        assert stopped["usage"]["completion_tokens"] <= 2 and stopped["choices"][0]["finish_reason"] == "stop"
    longer = client.post(route, json=body | {"min_tokens": 6, "ignore_eos": True}).json()
    assert longer["usage"]["completion_tokens"] == 6
