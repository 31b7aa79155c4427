"""Classifier examples through the admin API: a pack uploaded with its `examples` joins `model: "auto"`
after the background rebuild; PUT/GET/DELETE /admin/skillpacks/{name}/examples replace, read and
remove them (the router follows); bad or oversize examples are a 4xx naming the problem and
leave the store byte-for-byte as it was; the routes need the admin token."""
import hashlib
import json

import pytest

from skillpack_evals.skills import demo_split
from skillpacks.classifier import EXAMPLES_SUFFIX, CLASSIFIER_FILE, load_classifier
from tests.server.test_api_common import ADMIN, build_pack, serve, settings_for, snapshot

SKILL_OF = {"arith": "arithmetic", "sql": "sql"}
N_EXAMPLES, N_HELD_OUT = 40, 4


def jsonl(prompts: list[str]) -> bytes:
    return "".join(json.dumps({"prompt": p, "response": ""}) + "\n" for p in prompts).encode()


@pytest.fixture(scope="module")
def skills():
    """Per pack: its skill's training prompts (the examples) and held-out prompts."""
    out = {}
    for name, skill in SKILL_OF.items():
        train, held_out = demo_split(skill, n_train=N_EXAMPLES, n_test=N_HELD_OUT)
        out[name] = ([e.prompt for e in train], [e.prompt for e in held_out])
    return out


@pytest.fixture(scope="module")
def pack_files(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    return {name: build_pack(llama, folder / f"{name}.skillpack", name, scale=scale).read_bytes()
            for name, scale in (("arith", 1.0), ("sql", -1.0))}


def upload(client, data: bytes, examples: bytes | None = None, name: str | None = None):
    files = {"file": ("p.skillpack", data)} | ({"examples": ("e.jsonl", examples)} if examples is not None else {})
    form = {"replace": "true"} | ({"name": name} if name else {})
    return client.post("/admin/skillpacks", files=files, data=form, headers=ADMIN)


def put_examples(client, name: str, data, **headers):
    return client.put(f"/admin/skillpacks/{name}/examples", content=data, headers=ADMIN | headers)


def routed(client, prompt: str) -> str:
    r = client.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": prompt}],
                                                  "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers["X-SkillPack-Packs"]


def test_uploaded_examples_join_auto_and_the_router_follows_their_changes(llama, tmp_path, skills, pack_files):
    store = tmp_path / "store"
    store.mkdir()
    (store / "arith.skillpack").write_bytes(pack_files["arith"])
    (store / f"arith{EXAMPLES_SUFFIX}").write_bytes(jsonl(skills["arith"][0]))  # the folder workflow
    with serve(settings_for(llama, store)) as client:
        r = client.post("/v1/completions", json={"model": "auto", "prompt": "1 plus 1 is", "max_tokens": 1})
        assert r.status_code in (200, 503), r.text  # no router yet: this request starts the first build
        auto = client.app.state.pack_selector
        auto.wait_for_rebuild(timeout=300)
        assert auto.classifier.labels == ["arith"]

        sql_examples = jsonl(skills["sql"][0])
        r = upload(client, pack_files["sql"], sql_examples)
        assert r.status_code == 201, r.text
        sha = hashlib.sha256(sql_examples).hexdigest()
        assert r.json()["examples"] == {"prompts": N_EXAMPLES, "bytes": len(sql_examples), "sha256": sha}
        assert (store / f"sql{EXAMPLES_SUFFIX}").read_bytes() == sql_examples
        assert client.get("/admin/skillpacks/sql/examples", headers=ADMIN).content == sql_examples

        auto.wait_for_rebuild(timeout=300)  # the upload started it: no `auto` request in between
        manifest = load_classifier(store / CLASSIFIER_FILE).manifest
        assert manifest["labels"] == ["arith", "sql"] and manifest["packs"]["sql"]["examples_sha256"] == sha
        assert auto.status()["state"] == "fresh"
        for name in ("arith", "sql"):
            held_out = skills[name][1]
            assert sum(routed(client, p) == name for p in held_out) >= len(held_out) - 1, name

        fewer = jsonl(skills["sql"][0][:20])
        r = put_examples(client, "sql", fewer, **{"Content-Type": "application/jsonl"})
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "sql", "replaced": True, "examples": {
            "prompts": 20, "bytes": len(fewer), "sha256": hashlib.sha256(fewer).hexdigest()}}
        assert (store / f"sql{EXAMPLES_SUFFIX}").read_bytes() == fewer
        auto.wait_for_rebuild(timeout=300)
        manifest = load_classifier(store / CLASSIFIER_FILE).manifest
        assert manifest["packs"]["sql"]["examples_sha256"] == hashlib.sha256(fewer).hexdigest()
        assert manifest["version"] == 3

        r = client.delete("/admin/skillpacks/sql/examples", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"name": "sql", "deleted": True}
        assert not (store / f"sql{EXAMPLES_SUFFIX}").exists() and (store / "sql.skillpack").exists()
        auto.wait_for_rebuild(timeout=300)
        assert auto.classifier.labels == ["arith"] and auto.status()["state"] == "fresh"
        r = client.delete("/admin/skillpacks/sql/examples", headers=ADMIN)
        assert r.status_code == 404 and "`sql` has no router examples" in r.json()["error"]["message"]
        assert client.get("/admin/skillpacks/sql/examples", headers=ADMIN).status_code == 404

        # a new version of a pack keeps its examples; deleting the pack removes them
        assert upload(client, pack_files["sql"], name="arith").json()["examples"] is None
        assert (store / f"arith{EXAMPLES_SUFFIX}").read_bytes() == jsonl(skills["arith"][0])
        assert client.delete("/admin/skillpacks/arith", headers=ADMIN).status_code == 200
        auto.wait_for_rebuild(timeout=300)
        assert sorted(snapshot(store)) == ["router.safetensors", "sql.skillpack"]


BAD_EXAMPLES = {
    "not_json": (b'{"prompt": "fine"}\n{nope\n', "`examples` line 2 is not JSON (Expecting property name"),
    "no_prompt": (b'{"text": "where is it"}\n',
                  """`examples` line 1 has no non-empty 'prompt' string: '{"text": "where is it"}'"""),
    "prompt_not_a_string": (b'{"prompt": 42}\n', "line 1 has no non-empty 'prompt' string"),
    "blank_prompt": (b'{"prompt": "fine"}\n\n{"prompt": "   "}\n', "line 3 has no non-empty 'prompt'"),
    "not_an_object": (b'["prompt", "x"]\n', "line 1 has no non-empty 'prompt'"),
    "empty": (b"", "holds no prompts"),
    "only_blank_lines": (b"\n \n", "holds no prompts"),
    "prompt_too_long": (json.dumps({"prompt": "x" * 20_001}).encode(), "the prompt has 20001 characters"),
    "not_utf8": (b'{"prompt": "caf\xe9"}\n', "not UTF-8 text: byte 15 is 0xe9"),
}


@pytest.fixture(scope="module")
def error_store(tmp_path_factory, pack_files, skills):
    folder = tmp_path_factory.mktemp("store")
    (folder / "arith.skillpack").write_bytes(pack_files["arith"])
    (folder / f"arith{EXAMPLES_SUFFIX}").write_bytes(jsonl(skills["arith"][0]))
    return folder


@pytest.fixture(scope="module")
def error_client(llama, error_store):
    with serve(settings_for(llama, error_store)) as c:
        yield c


@pytest.mark.parametrize("case", sorted(BAD_EXAMPLES))
def test_bad_examples_are_refused_and_leave_the_store_unchanged(error_client, error_store, pack_files, case):
    data, message = BAD_EXAMPLES[case]
    before = snapshot(error_store)
    listed = error_client.get("/admin/skillpacks", headers=ADMIN).json()
    for r in (upload(error_client, pack_files["sql"], data), put_examples(error_client, "arith", data)):
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "examples" and error["code"] == "invalid_examples", r.text
        assert message in error["message"]
        assert snapshot(error_store) == before  # no pack, no sidecar, no temporary file
        assert error_client.get("/admin/skillpacks", headers=ADMIN).json() == listed  # `sql` never registered


def test_examples_route_refusals(error_client, error_store, pack_files, skills):
    before = snapshot(error_store)
    good = jsonl(skills["sql"][0])
    r = put_examples(error_client, "nope", good)
    assert r.status_code == 404 and "`nope` does not exist" in r.json()["error"]["message"]
    r = put_examples(error_client, "bad name", good)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_pack_name"
    r = error_client.put("/admin/skillpacks/arith/examples", files={"examples": ("e.jsonl", good)}, headers=ADMIN)
    assert r.status_code == 415 and "raw request body" in r.json()["error"]["message"]
    r = error_client.post("/admin/skillpacks", files=[("file", ("p", pack_files["sql"])), ("examples", ("a", good)),
                                                      ("examples", ("b", good))], headers=ADMIN)
    assert r.status_code == 400 and "two `examples` parts" in r.json()["error"]["message"]
    r = upload(error_client, pack_files["sql"][:1000], good)  # good examples cannot carry a bad pack
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_pack"
    assert snapshot(error_store) == before
    for method in ("PUT", "GET", "DELETE"):
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            r = error_client.request(method, "/admin/skillpacks/arith/examples", content=good, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (method, r.text)
    assert snapshot(error_store) == before


def test_examples_over_the_size_limit_are_413(llama, tmp_path, pack_files, skills):
    store = tmp_path / "store"
    store.mkdir()
    (store / "arith.skillpack").write_bytes(pack_files["arith"])
    limit = 2048
    big = jsonl(skills["sql"][0])
    assert len(big) > limit
    with serve(settings_for(llama, store, max_examples_bytes=limit)) as client:
        before = snapshot(store)
        listed = client.get("/admin/skillpacks", headers=ADMIN).json()
        responses = [
            upload(client, pack_files["sql"], big),  # the multipart part, cut off as it streams
            put_examples(client, "arith", big),  # a declared Content-Length over the limit
            put_examples(client, "arith", iter([big[:1024], big[1024:]])),  # chunked: counted as it arrives
        ]
        for r in responses:
            assert r.status_code == 413 and str(limit) in r.json()["error"]["message"], r.text
        assert snapshot(store) == before
        assert client.get("/admin/skillpacks", headers=ADMIN).json() == listed
        small = jsonl(skills["sql"][0][:5])
        assert len(small) <= limit and put_examples(client, "arith", small).status_code == 200
