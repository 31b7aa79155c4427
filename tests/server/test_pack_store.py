"""The admin pack store on the real engine: upload, list, inspect, load/pin, replace, delete;
malformed uploads leave the store byte-for-byte unchanged; the startup scan; live replacement."""
import json
import threading

import httpx
import pytest

from skillpacks.format import read_manifest
from tests.server.test_api_common import ADMIN, build_pack, live_server, serve, settings_for, snapshot

PROMPT = "3 plus 4 is"


@pytest.fixture(scope="module")
def pack_files(llama, other_base, tmp_path_factory):
    """Pack files to upload: two of the llama pair, one built on another base."""
    folder = tmp_path_factory.mktemp("uploads")
    return {
        "alpha": build_pack(llama, folder / "alpha.skillpack", "alpha").read_bytes(),
        "beta": build_pack(llama, folder / "beta.skillpack", "beta", scale=-1.0).read_bytes(),
        "foreign": build_pack(other_base, folder / "foreign.skillpack", "foreign").read_bytes(),
    }


@pytest.fixture
def store(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    return folder


def upload(client, data: bytes, name: str | None = None, filename: str = "x.skillpack",
           replace: bool | str | None = None):
    form = ({"name": name} if name is not None else {}) | ({"replace": str(replace).lower()} if replace is not None else {})
    return client.post("/admin/skillpacks", files={"file": (filename, data)}, data=form or None, headers=ADMIN)


def greedy(client, model):
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_upload_list_inspect_cache_actions_delete(llama, store, pack_files):
    with serve(settings_for(llama, store)) as client:
        base = client.app.state.engine.model_id
        r = upload(client, pack_files["alpha"])
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "alpha" and r.json()["replaced"] is False
        assert (store / "alpha.skillpack").read_bytes() == pack_files["alpha"]
        assert sorted(snapshot(store)) == ["alpha.skillpack"]  # no temporary file left behind

        listed = client.get("/admin/skillpacks", headers=ADMIN).json()["data"]
        assert [p["name"] for p in listed] == ["alpha"] and listed[0]["version"] >= 1
        assert "alpha" in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert greedy(client, "alpha") != greedy(client, base)

        info = client.get("/admin/skillpacks/alpha", headers=ADMIN).json()
        assert info["manifest"]["name"] == "alpha" and info["status"]["name"] == "alpha"
        assert info["manifest"] == json.loads(json.dumps(read_manifest(store / "alpha.skillpack")))

        assert client.post("/admin/skillpacks/alpha/load", headers=ADMIN).json()["state"] == "device"
        assert client.post("/admin/skillpacks/alpha/pin", headers=ADMIN).json()["pinned"] is True
        assert client.post("/admin/skillpacks/alpha/unpin", headers=ADMIN).json()["pinned"] is False
        assert client.post("/admin/skillpacks/alpha/unload", headers=ADMIN).json()["state"] == "disk"
        assert greedy(client, "alpha")  # loads again on use

        r = client.delete("/admin/skillpacks/alpha", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"name": "alpha", "deleted": True}
        assert snapshot(store) == {}
        assert client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT}).status_code == 404
        for method, path in [("GET", "/admin/skillpacks/alpha"), ("DELETE", "/admin/skillpacks/alpha"),
                             ("POST", "/admin/skillpacks/alpha/load"), ("POST", "/admin/skillpacks/alpha/pin")]:
            r = client.request(method, path, headers=ADMIN)
            assert r.status_code == 404 and "`alpha`" in r.json()["error"]["message"]


def test_name_field_and_replacement(llama, store, pack_files):
    with serve(settings_for(llama, store)) as client:
        assert upload(client, pack_files["alpha"], name="math").json()["name"] == "math"
        first = greedy(client, "math")
        v1 = client.get("/admin/skillpacks/math", headers=ADMIN).json()["status"]["version"]
        for replace in (None, False):  # a taken name is refused unless the upload asks to replace it
            r = upload(client, pack_files["beta"], name="math", replace=replace)
            assert r.status_code == 409 and r.json()["error"]["code"] == "pack_exists", r.text
            assert "`math`" in r.json()["error"]["message"] and "replace=true" in r.json()["error"]["message"]
            assert (store / "math.skillpack").read_bytes() == pack_files["alpha"]
        r = upload(client, pack_files["alpha"], replace=True)
        assert r.status_code == 201 and r.json() | {"manifest": None} == {  # a manifest's name is free: no 409
            "name": "alpha", "replaced": False, "bytes": len(pack_files["alpha"]), "manifest": None, "examples": None}
        assert upload(client, pack_files["alpha"]).status_code == 409  # taken now, by the manifest's name
        assert upload(client, pack_files["alpha"], replace="maybe").status_code == 400
        client.delete("/admin/skillpacks/alpha", headers=ADMIN)
        r = upload(client, pack_files["beta"], name="math", replace=True)
        assert r.status_code == 201 and r.json()["replaced"] is True
        assert client.get("/admin/skillpacks/math", headers=ADMIN).json()["status"]["version"] > v1
        assert (store / "math.skillpack").read_bytes() == pack_files["beta"]
        assert greedy(client, "math") != first  # the new version serves
        assert sorted(snapshot(store)) == ["math.skillpack"]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]


@pytest.mark.parametrize("case", ["truncated", "flipped_payload", "flipped_header", "wrong_base", "bad_name",
                                  "traversal_name", "empty", "not_a_pack"])
def test_malformed_uploads_leave_the_store_unchanged(llama, store, pack_files, case):
    good = pack_files["alpha"]
    data, name = {
        "truncated": (good[: len(good) // 2], None),
        "flipped_payload": (_flip(good, len(good) - 10), None),
        "flipped_header": (_flip(good, 40), None),
        "wrong_base": (pack_files["foreign"], None),
        "bad_name": (good, "has space"),
        "traversal_name": (good, "../../etc/passwd"),
        "empty": (b"", None),
        "not_a_pack": (b"hello world, not a safetensors file" * 10, None),
    }[case]
    with serve(settings_for(llama, store)) as client:
        assert upload(client, pack_files["beta"], name="alpha").status_code == 201  # something to keep
        before = snapshot(store)
        listed = client.get("/admin/skillpacks", headers=ADMIN).json()
        r = upload(client, data, name=name)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["message"]
        assert snapshot(store) == before
        assert client.get("/admin/skillpacks", headers=ADMIN).json() == listed


def test_oversize_upload_is_cut_off_with_413(llama, store, pack_files):
    limit = len(pack_files["alpha"]) // 3
    with serve(settings_for(llama, store, max_upload_bytes=limit)) as client:
        r = upload(client, pack_files["alpha"])
        assert r.status_code == 413 and str(limit) in r.json()["error"]["message"]
        assert snapshot(store) == {}


@pytest.mark.parametrize("kind", ["not_multipart", "no_file_part", "two_files"])
def test_malformed_forms_are_refused(llama, store, pack_files, kind):
    with serve(settings_for(llama, store)) as client:
        if kind == "not_multipart":
            r = client.post("/admin/skillpacks", content=pack_files["alpha"], headers=ADMIN)
        elif kind == "no_file_part":
            r = client.post("/admin/skillpacks", data={"name": "x"}, files={"other": ("a", b"1")}, headers=ADMIN)
        else:
            r = client.post("/admin/skillpacks", files=[("file", ("a", pack_files["alpha"])),
                                                        ("file", ("b", pack_files["beta"]))], headers=ADMIN)
        assert r.status_code in (400, 415) and r.json()["error"]["param"] == "file", r.text
        assert snapshot(store) == {}


def test_startup_registers_valid_packs_and_skips_the_rest(llama, store, pack_files):
    (store / "alpha.skillpack").write_bytes(pack_files["alpha"])
    (store / "broken.skillpack").write_bytes(pack_files["beta"][:1000])
    (store / "foreign.skillpack").write_bytes(pack_files["foreign"])
    (store / "bad name.skillpack").write_bytes(pack_files["beta"])
    (store / ".upload-stale.part").write_bytes(b"half an upload")
    with serve(settings_for(llama, store)) as client:
        names = [p["name"] for p in client.get("/admin/skillpacks", headers=ADMIN).json()["data"]]
        assert names == ["alpha"]
        assert not (store / ".upload-stale.part").exists()
        assert (store / "broken.skillpack").exists()  # reported and skipped, never deleted


def test_replace_and_delete_while_requests_run(llama, store, pack_files):
    """Requests on a pack keep succeeding while it is replaced; one streaming when it is
    deleted finishes normally."""
    with live_server(settings_for(llama, store)) as url, httpx.Client(base_url=url, timeout=120) as http:
        def up(data):
            r = http.post("/admin/skillpacks", files={"file": ("p", data)}, data={"name": "live", "replace": "true"},
                          headers=ADMIN)
            assert r.status_code == 201, r.text

        up(pack_files["alpha"])
        failures, done = [], threading.Event()

        def worker():
            with httpx.Client(base_url=url, timeout=120) as own:
                while not done.is_set():
                    r = own.post("/v1/completions", json={"model": "live", "prompt": PROMPT, "max_tokens": 4})
                    if r.status_code != 200:
                        failures.append(r.text)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for data in (pack_files["beta"], pack_files["alpha"], pack_files["beta"]):
            up(data)
        with http.stream("POST", "/v1/completions", json={"model": "live", "prompt": PROMPT, "max_tokens": 12,
                                                          "stream": True}) as streaming:
            lines = streaming.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            done.set()
            for t in threads:
                t.join()
            assert http.delete("/admin/skillpacks/live", headers=ADMIN).status_code == 200
            rest = [line for line in lines if line.startswith("data: ")]
        assert streaming.status_code == 200 and json.loads(first[6:])["choices"]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        assert failures == []
        assert http.post("/v1/completions", json={"model": "live", "prompt": PROMPT}).status_code == 404
        assert snapshot(store) == {}
