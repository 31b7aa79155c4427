"""Hostile input over HTTP: generated malformed pack files (4xx, store unchanged, bounded
memory), uploads cut off at the limit while they stream, path-traversal and odd pack names,
and out-of-range request fields; every answer a 4xx in the OpenAI envelope, never a 5xx."""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import struct
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from skillpack_server.app import MULTIPART_OVERHEAD
from tests.server.test_api_common import ADMIN, serve, settings_for, snapshot
from tests.skillpacks.test_verify import raw_header, rewrite

MiB = 1024 * 1024
# per operation (valid and invalid requests mixed), each sent with and without the admin token;
# raise SKILLPACK_FUZZ_EXAMPLES for a longer run by hand
FUZZ_EXAMPLES = int(os.environ.get("SKILLPACK_FUZZ_EXAMPLES", "12"))
Q = "model.layers.0.self_attn.q_proj.weight"
EXACT = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


def rss_bytes() -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


class PeakRSS:
    """Samples this process's RSS in a thread while the block runs; `growth` is peak - start."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.start


def with_header(good: bytes, edit) -> bytes:
    """The pack with its JSON header edited (the payload and its checksum untouched)."""
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8: 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + good[8 + n:]


def edit_manifest(module: str | None, key_path: list, value):
    """Set manifest[key_path] (within the entry of `module`, when given) to `value`."""
    def edit(header):
        manifest = json.loads(header["__metadata__"]["skillpack"])
        target = manifest if module is None else next(m for m in manifest["modules"] if m["name"] == module)
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
        header["__metadata__"]["skillpack"] = json.dumps(manifest)
    return edit


def edit_entry(tensor: str, field: str, value):
    def edit(header):
        header[tensor][field] = value
    return edit


def rewritten(src: Path, tmp: Path, edit_tensors=None, manifest_edit=None) -> bytes:
    """A pack re-saved with edited tensors or manifest and a *correct* checksum."""
    return rewrite(src, tmp / "edited.skillpack", edit_tensors, manifest_edit).read_bytes()


def set_value(name: str, value: float, index: int = 0):
    def edit(tensors):
        flat = tensors[name].view(-1)
        flat[index] = value
    return edit


def malformed_packs(good_path: Path, tmp: Path) -> dict[str, bytes]:
    """Hostile variants of one good pack, by the fault each carries."""
    good = good_path.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header, _ = raw_header(good_path)
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    s_entry = f"{Q}:s"
    codes = f"{Q}:A.0.codes"
    return {
        # headers
        "random_bytes": bytes(range(256)) * 64,
        "header_length_2^63": struct.pack("<Q", 2**63) + good[8:],
        "header_length_past_end": struct.pack("<Q", len(good)) + good[8:],
        "header_not_json": struct.pack("<Q", 16) + b"{not json at all" + good[24:],
        "header_deep_nesting": struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000,
        "header_is_a_list": struct.pack("<Q", 8) + b"[1,2,3] ",
        "only_the_prefix": good[:8],
        "truncated_payload": good[: 8 + n + (len(good) - 8 - n) // 2],
        "trailing_garbage": good + b"\0" * 64,
        # offsets and declared sizes
        "offsets_past_the_end": with_header(good, edit_entry(s_entry, "data_offsets", [end, end + 4 * 2**30])),
        "offsets_overlap": with_header(good, edit_entry(s_entry, "data_offsets", [0, 4 * header[s_entry]["shape"][0]])),
        "huge_shape": with_header(good, edit_entry(s_entry, "shape", [2**39, 2**39])),
        "huge_rank_in_manifest": with_header(good, edit_manifest(Q, ["layout", "rank"], 2**40)),
        "huge_tier_rank_in_manifest": with_header(good, edit_manifest(Q, ["layout", "tiers", 0, "rank"], 2**40)),
        "huge_nnz_in_manifest": with_header(good, edit_manifest(EMBED, ["layout", "nnz"], 2**40)),
        "huge_module_shape": with_header(good, edit_manifest(Q, ["shape"], [2**40, 2**40])),
        "100k_modules": with_header(good, edit_manifest(None, ["modules"],
                                                        [{"name": f"m{i}"} for i in range(100_000)])),
        "negative_dim": with_header(good, edit_entry(s_entry, "shape", [-4])),
        # dtype and shape lies (same byte span, so only the manifest can tell)
        "dtype_lie_f32_as_i32": with_header(good, edit_entry(s_entry, "dtype", "I32")),
        "dtype_lie_u8_as_i8": with_header(good, edit_entry(codes, "dtype", "I8")),
        "shape_lie_transposed": with_header(good, edit_entry(codes, "shape", header[codes]["shape"][::-1])),
        "unknown_dtype": with_header(good, edit_entry(s_entry, "dtype", "F128")),
        # values (checksums recomputed, so verification must look at the numbers)
        "nan_singular_value": rewritten(good_path, tmp, set_value(s_entry, math.nan)),
        "inf_scale": rewritten(good_path, tmp, set_value(f"{Q}:A.0.scales", math.inf)),
        "nan_exact_delta": rewritten(good_path, tmp, set_value(f"{EXACT}:delta", math.nan, 3)),
        "negative_singular_value": rewritten(good_path, tmp, set_value(s_entry, -1.0)),
        "checksum_mismatch": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        # base
        "wrong_base_weights": rewritten(good_path, tmp, None,
                                        lambda m: m["base"].__setitem__("weights_sha256", "0" * 64)),
        "wrong_base_architecture": rewritten(good_path, tmp, None,
                                             lambda m: m["base"].__setitem__("architecture", "GPT2LMHeadModel")),
        "wrong_base_shape": rewritten(good_path, tmp, None,
                                      lambda m: m["base"]["tensors"].__setitem__(Q, [65, 64])),
        "module_not_in_base": rewritten(good_path, tmp, None,
                                        lambda m: m["modules"][0].__setitem__("name", "model.evil.weight")),
        # names carried inside the file
        "traversal_name_in_manifest": rewritten(good_path, tmp, None, lambda m: m.__setitem__("name", "../../evil")),
        "format_version_99": rewritten(good_path, tmp, None, lambda m: m.__setitem__("format_version", 99)),
    }


@pytest.fixture(scope="module")
def hostile(pack_paths, tmp_path_factory):
    return malformed_packs(pack_paths["skill"], tmp_path_factory.mktemp("hostile"))


def test_the_generator_only_breaks_what_it_says(pack_paths, tmp_path):
    """`rewrite` with no edit keeps a pack valid, so each variant fails for its own fault."""
    from skillpacks.format import verify_pack

    data = rewritten(pack_paths["skill"], tmp_path)
    (tmp_path / "same.skillpack").write_bytes(data)
    assert verify_pack(tmp_path / "same.skillpack")["name"] == "skill"
    assert load_file(str(tmp_path / "same.skillpack"))[f"{Q}:s"].isfinite().all()


def test_malformed_packs_are_refused_with_4xx_and_bounded_memory(pair, pack_bytes, hostile, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "skill.skillpack").write_bytes(pack_bytes["skill"])
    with serve(settings_for(pair, store)) as client:
        before = snapshot(store)
        listed = client.get("/admin/skillpacks", headers=ADMIN).json()
        refused = {}
        with PeakRSS() as memory:
            for case, data in hostile.items():
                r = client.post("/admin/skillpacks", files={"file": ("x.skillpack", data)},
                                data={"name": "incoming"}, headers=ADMIN)
                refused[case] = r.status_code
                assert 400 <= r.status_code < 500, (case, r.text)
                assert r.json()["error"]["message"], case
        assert snapshot(store) == before
        assert client.get("/admin/skillpacks", headers=ADMIN).json() == listed
        assert client.post("/v1/completions", json={"model": "skill", "prompt": "hi"}).status_code == 200
    assert len(refused) == len(hostile) >= 30
    # the largest hostile file is ~400 kB; declared sizes of up to 2**78 bytes were never allocated
    assert memory.growth < 64 * MiB, f"RSS grew by {memory.growth / MiB:.0f} MiB during the uploads"


async def asgi_upload(app, chunks, limit_chunks: int) -> tuple[int, int, bytes]:
    """POST an endless chunked upload straight into the ASGI app: (status, bytes it pulled, body)."""
    pulled, sent = 0, []
    boundary = b"cut-off-boundary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n')

    async def receive():
        nonlocal pulled
        if pulled == 0:
            pulled += len(head)
            return {"type": "http.request", "body": head, "more_body": True}
        if pulled > limit_chunks * len(chunks):  # a client that would never stop: the app must
            raise AssertionError("the app kept reading past the limit")
        pulled += len(chunks)
        return {"type": "http.request", "body": chunks, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/admin/skillpacks", "raw_path": b"/admin/skillpacks", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {ADMIN['Authorization'].split()[1]}".encode()),
                         (b"content-type", b"multipart/form-data; boundary=" + boundary),
                         (b"transfer-encoding", b"chunked")]}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], pulled, body


def test_an_endless_upload_without_content_length_is_cut_off_at_the_limit(pair, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    limit = 256 * 1024
    chunk = b"\xab" * 65536
    with serve(settings_for(pair, store, max_upload_bytes=limit)) as client:
        status, pulled, body = asyncio.run(asgi_upload(client.app, chunk, limit_chunks=64))
    assert status == 413, body
    assert str(limit + MULTIPART_OVERHEAD) in json.loads(body)["error"]["message"]
    assert pulled <= limit + MULTIPART_OVERHEAD + 2 * len(chunk)  # stopped reading right after the limit
    assert snapshot(store) == {}


HOSTILE_NAMES = ["../evil", "..", ".", "a/b", "a\\b", "/abs", "evil\x00", "has space", "x" * 65, "-lead",
                 ".hidden", "%2e%2e%2fevil", "ünïcode", "a;rm -rf /", "new\nline", "skill.skillpack/../x", ""]


def test_traversal_and_odd_pack_names_are_refused_everywhere(pair, pack_bytes, tmp_path):
    root = tmp_path / "root"
    store = root / "store"
    store.mkdir(parents=True)
    (root / "victim.skillpack").write_bytes(b"outside the store")
    (store / "skill.skillpack").write_bytes(pack_bytes["skill"])
    everything = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with serve(settings_for(pair, store)) as client:
        for name in HOSTILE_NAMES:
            if not name:
                continue  # an empty name field means "take the manifest's name"
            r = client.post("/admin/skillpacks", files={"file": ("x", pack_bytes["steady-a"])}, data={"name": name},
                            headers=ADMIN)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_pack_name", (name, r.text)
        for raw in ["..%2Fvictim", "..%2F..%2Fvictim", "%2e%2e", "a%00b", "skill%2F..%2Fskill", "x" * 300,
                    "%C3%BC", "..%5Cvictim", "victim%20"]:
            for method, suffix in [("GET", ""), ("DELETE", ""), ("POST", "/load"), ("POST", "/pin"),
                                   ("POST", "/unload"), ("POST", "/unpin")]:
                r = client.request(method, f"/admin/skillpacks/{raw}{suffix}", headers=ADMIN)
                assert r.status_code in (400, 404, 405), (method, raw, r.status_code, r.text)
        assert client.post("/v1/completions", json={"model": "../skill", "prompt": "hi"}).status_code == 404
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == everything


BAD_FIELDS = [
    ("max_tokens", -1), ("max_tokens", 10**9), ("max_tokens", 1.5), ("max_tokens", "many"), ("max_tokens", 2**70),
    ("temperature", -0.1), ("temperature", 2.01), ("temperature", math.inf), ("temperature", math.nan),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan), ("seed", 2**64),
    ("logprobs", 6), ("logprobs", -1), ("n", 100), ("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 257),
    ("skillpacks", [{"name": "skill", "weight": 4.5}]), ("skillpacks", [{"name": "skill", "weight": -9}]),
    ("skillpacks", [{"name": "skill", "weight": math.inf}]), ("skillpacks", [{"name": "skill", "weight": math.nan}]),
    ("skillpacks", [{"name": "skill", "weight": "heavy"}]), ("skillpacks", []),
    ("skillpacks", [{"name": f"p{i}"} for i in range(9)]), ("skillpacks", [{"name": "skill"}, {"name": "skill"}]),
    ("skillpacks", [{"name": "skill", "weight": 1, "evil": True}]), ("prompt", [10**12]), ("prompt", [-1]),
    ("prompt", ""), ("prompt", [[1], []]), ("prompt", {"text": "hi"}), ("model", ""), ("model", "x" * 300),
]


@pytest.fixture(scope="module")
def bounds_client(pair, pack_paths, tmp_path_factory):
    store = tmp_path_factory.mktemp("bounds")
    (store / "skill.skillpack").write_bytes(pack_paths["skill"].read_bytes())
    with serve(settings_for(pair, store)) as client:
        yield client


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={str(v)[:20]}" for f, v in BAD_FIELDS])
def test_out_of_range_fields_are_refused_by_name(bounds_client, field, value):
    base = bounds_client.app.state.engine.model_id
    body = {"model": base, "prompt": "hi", "max_tokens": 2, field: value}
    text = json.dumps(body)  # NaN and Infinity as the bare literals some clients send
    r = bounds_client.post("/v1/completions", content=text, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 404, 422), (field, value, r.text)
    error = r.json()["error"]
    assert error["message"] and (error["param"] or "").split(".")[0] in (field, "prompt"), error


def test_huge_prompts_are_refused(bounds_client):
    base = bounds_client.app.state.engine.model_id
    too_long = bounds_client.post("/v1/completions", json={"model": base, "prompt": "word " * 500_000})
    assert too_long.status_code in (400, 413) and too_long.json()["error"]["message"]
    over_body = bounds_client.post("/v1/completions", json={"model": base, "prompt": "x" * (5 * MiB)})
    assert over_body.status_code == 413
    ids = bounds_client.post("/v1/completions", json={"model": base, "prompt": [5] * 200_000})
    assert ids.status_code == 400 and ids.json()["error"]["code"] == "context_length_exceeded"
    chat = bounds_client.post("/v1/chat/completions", json={
        "model": base, "messages": [{"role": "user", "content": "hi " * 1000}] * 100})
    assert chat.status_code == 400, chat.text
    for extreme in ({"max_tokens": 127}, {"max_tokens": 0}):
        r = bounds_client.post("/v1/completions", json={"model": base, "prompt": [5] * 120, **extreme})
        assert r.status_code in (200, 400), r.text
    assert bounds_client.get("/health").json()["status"] == "ok"


def test_fuzzing_the_openapi_schema_never_gives_a_5xx(pair, pack_paths, tmp_path):
    """schemathesis draws valid and invalid requests for every operation of the app's own
    OpenAPI schema, with and without the admin token, against a real uvicorn server."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation import GenerationMode

    from tests.server.test_api_common import live_server

    store = tmp_path / "store"
    store.mkdir()
    (store / "skill.skillpack").write_bytes(pack_paths["skill"].read_bytes())
    tried, failures = {}, []
    with live_server(settings_for(pair, store, max_model_len=32)) as url:
        schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            strategy = (operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
                        | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def probe(case):
                for headers in (ADMIN, {}):
                    response = case.call(base_url=url, headers=headers, timeout=60)
                    tried[label] = tried.get(label, 0) + 1
                    if response.status_code >= 500:
                        failures.append(f"{label} -> {response.status_code}: {case.body!r:.300} {response.text:.300}")

            probe()
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert failures == [], f"{len(failures)} of {sum(tried.values())} requests got a 5xx:\n" + "\n".join(failures)
    assert len(tried) >= 10 and sum(tried.values()) >= 10 * FUZZ_EXAMPLES, tried
    assert not [p.name for p in store.iterdir() if p.name.startswith(".upload-")]
