"""One replica's app without a cluster: two replicas over one shared store, against the single-process app.

The oracle for every answer is the plain single-process server (`create_app` on its own
copy of the packs) given the same request: a replica must answer exactly as it does,
whichever replica a pack was uploaded through. Around that: the replica header, the
loader being called with the routing pack, and a miss making the replica rescan.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from skillpack_server.ray_serve import REPLICA_HEADER, replica_app
from tests.scale.conftest import PACK_SCALES
from tests.server.test_api_common import ADMIN, settings_for

PROMPT = "3 plus 4 is"


class RecordingLoader:
    """Stands where Ray's `serve.multiplexed` goes: records each call, then runs the real loader."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, loader):
        async def load(name: str):
            self.calls.append(name)
            return await loader(name)

        return load


def replica(llama, shared, mirror, name: str, loader: RecordingLoader) -> TestClient:
    """A replica's app (its own mirror, never rescanning on a timer here) under a TestClient."""
    app = replica_app(settings_for(llama, mirror), str(shared), rescan_seconds=3600, replica=name,
                      wrap_loader=loader)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def replicas(llama, stores, tmp_path_factory):
    loaders = {"replica-a": RecordingLoader(), "replica-b": RecordingLoader()}
    clients = {}
    for name, loader in loaders.items():
        clients[name] = replica(llama, stores[0], tmp_path_factory.mktemp(name), name, loader).__enter__()
    yield clients, loaders
    for client in clients.values():
        client.__exit__(None, None, None)


def complete(client, model: str, headers: dict | None = None, **extra) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1} | extra
    response = client.post("/v1/completions", json=body, headers=headers or {})
    assert response.status_code == 200, response.text
    return response


def answer(response) -> tuple[str, list, list]:
    """Text, tokens, and each token's logprob to 1e-5 (the packs move them far more than that)."""
    choice = response.json()["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], [round(lp, 5) for lp in choice["logprobs"]["token_logprobs"]]


def base_id(client) -> str:
    return next(m["id"] for m in client.get("/v1/models").json()["data"] if m.get("parent") is None)


def test_every_response_names_its_replica(replicas):
    clients, _ = replicas
    for name, client in clients.items():
        assert client.get("/health").headers[REPLICA_HEADER] == name
        missing = client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
        assert missing.status_code == 404 and missing.headers[REPLICA_HEADER] == name


def test_replicas_answer_like_the_single_process_server(replicas, reference):
    clients, loaders = replicas
    base = base_id(reference)
    expected_by_model = {model: answer(complete(reference, model)) for model in ("skill", "skill2x", base)}
    assert len({str(e[2]) for e in expected_by_model.values()}) == 3  # each pack changes the answer
    for model, expected in expected_by_model.items():
        for name, client in clients.items():
            assert answer(complete(client, model, {"serve_multiplexed_model_id": model})) == expected
    mix = [{"name": "skill", "weight": 0.5}, {"name": "skill2x", "weight": 0.25}]
    assert answer(complete(clients["replica-a"], base, skillpacks=mix)) == answer(complete(reference, base,
                                                                                           skillpacks=mix))


def test_the_loader_gets_the_routing_pack_and_puts_it_on_the_device(replicas):
    clients, loaders = replicas
    client, loader = clients["replica-b"], loaders["replica-b"]
    loader.calls.clear()
    complete(client, "skill", {"serve-multiplexed-model-id": "skill"})  # the hyphenated form gateways send
    complete(client, "skill2x")  # no header: the body's model routes
    complete(client, base_id(client), {"serve_multiplexed_model_id": base_id(client)})  # the base is no pack
    assert loader.calls == ["skill", "skill2x"]
    states = {p["name"]: p["state"] for p in client.get("/admin/skillpacks", headers=ADMIN).json()["data"]}
    assert states["skill"] == states["skill2x"] == "device"


def test_an_upload_through_one_replica_serves_from_the_other_at_once(replicas, reference, pack_files):
    clients, _ = replicas
    a, b = clients["replica-a"], clients["replica-b"]
    with open(pack_files["unskill"], "rb") as f:
        uploaded = a.post("/admin/skillpacks", headers=ADMIN, files={"file": ("unskill.skillpack", f)})
    assert uploaded.status_code == 201, uploaded.text
    # B never rescans on its own here (rescan_seconds=3600): the miss makes it sync
    assert answer(complete(b, "unskill")) == answer(complete(reference, "unskill"))

    assert a.delete("/admin/skillpacks/unskill", headers=ADMIN).status_code == 200
    listed = {m["id"] for m in b.get("/v1/models").json()["data"]}  # a listing syncs first
    assert "unskill" not in listed and set(PACK_SCALES) - {"unskill"} <= listed
    gone = b.post("/v1/completions", json={"model": "unskill", "prompt": PROMPT})
    assert gone.status_code == 404 and "unskill" in gone.json()["error"]["message"]
