"""The shared pack store: what one replica uploads, replaces or deletes, another picks up on sync.

Two replicas are two `SharedPackStore`s, each with its own mirror folder and its own real
engine's pack cache, over one shared location: a local folder (renames) and an fsspec
`memory://` store (put + move, the object-store path). The oracle is the shared store's
own bytes: after a sync, each replica's mirror holds exactly the shared files, byte for
byte, and its pack cache knows exactly those names.
"""
from __future__ import annotations

import asyncio
import uuid

import fsspec
import pytest

from skillpack_server.engine.engine import Engine
from skillpack_server.errors import status_of
from skillpack_server.exceptions import DomainError
from skillpack_server.pack_store_remote import SharedPackStore, SyncReport
from skillpack_server.settings import EngineSettings
from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint


@pytest.fixture(scope="module")
def engines(llama):
    fp = base_fingerprint(open_checkpoint(llama.base))
    pair = [Engine(llama.base, EngineSettings(device="cpu", max_batch=2, max_model_len=32, page_size=4),
                   fingerprint=fp) for _ in range(2)]
    yield pair, fp
    for engine in pair:
        engine.close()


@pytest.fixture(params=["folder", "memory"])
def shared(request, tmp_path):
    if request.param == "folder":
        yield str(tmp_path / "shared")
    else:
        where = f"memory://skillpack-tests/{uuid.uuid4().hex}"
        yield where
        fs, root = fsspec.core.url_to_fs(where)
        fs.rm(root, recursive=True)


def make_store(shared, mirror, engine, fp, max_upload_bytes=64 * 1024 * 1024) -> SharedPackStore:
    for name in list(engine.pack_cache.names()):
        engine.pack_cache.unregister(name)  # the module's engines start each test empty
    return SharedPackStore(shared, mirror, engine.pack_cache, fp, max_upload_bytes)


def put_shared(shared: str, name: str, data: bytes) -> None:
    fs, root = fsspec.core.url_to_fs(shared)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}.skillpack", data)


def shared_files(shared: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(shared)
    return {info["name"].rsplit("/", 1)[-1].removesuffix(".skillpack"): fs.cat_file(info["name"])
            for info in fs.ls(root, detail=True) if info["name"].endswith(".skillpack")}


def assert_in_step(store: SharedPackStore, shared: str) -> None:
    """The mirror holds the shared files byte for byte (nothing else), and the cache knows exactly them."""
    expected = shared_files(shared)
    mirror = {p.name.removesuffix(".skillpack"): p.read_bytes() for p in store.root.iterdir()}
    assert mirror == expected
    assert sorted(s.name for s in store.pack_cache.status()) == sorted(expected)


async def upload(store: SharedPackStore, data: bytes, name: str) -> tuple[str, dict, bool]:
    staging = store.staging()
    staging.write(data)
    return await store.commit(staging, name, replace=True)


def test_uploads_replacements_and_deletes_reach_the_other_replica(engines, shared, tmp_path, pack_files):
    (engine_a, engine_b), fp = engines
    skill, skill2x, unskill = (pack_files[n].read_bytes() for n in ("skill", "skill2x", "unskill"))
    put_shared(shared, "skill", skill)
    a = make_store(shared, tmp_path / "mirror-a", engine_a, fp)
    b = make_store(shared, tmp_path / "mirror-b", engine_b, fp)

    async def scenario():
        assert await a.sync() == SyncReport(added=["skill"])
        assert_in_step(a, shared)

        name, manifest, replaced = await upload(a, skill2x, "skill2x")
        assert (name, replaced) == ("skill2x", False) and manifest["name"] == "skill2x"
        assert shared_files(shared)["skill2x"] == skill2x  # published before the upload returns
        assert await b.sync() == SyncReport(added=["skill", "skill2x"])
        assert_in_step(b, shared)

        # B replaces `skill` with other bytes: A gets a new version of the same name
        assert (await upload(b, unskill, "skill"))[2] is True
        version = next(s.version for s in a.pack_cache.status() if s.name == "skill")
        assert await a.sync() == SyncReport(replaced=["skill"])  # A published skill2x itself
        assert next(s.version for s in a.pack_cache.status() if s.name == "skill") == version + 1
        assert_in_step(a, shared)

        await a.delete("skill2x")
        assert "skill2x" not in shared_files(shared)
        assert await b.sync() == SyncReport(removed=["skill2x"])
        assert_in_step(b, shared)
        assert await b.sync() == SyncReport()  # nothing changed since: nothing downloaded

    asyncio.run(scenario())


def test_bad_and_oversized_shared_files_are_skipped_and_leave_nothing(engines, shared, tmp_path, pack_files):
    (engine_a, _), fp = engines
    skill = pack_files["skill"].read_bytes()
    put_shared(shared, "skill", skill)
    put_shared(shared, "broken", b"not a safetensors file" * 64)
    store = make_store(shared, tmp_path / "mirror", engine_a, fp)

    async def scenario():
        assert await store.sync() == SyncReport(added=["skill"], rejected=["broken"])
        assert await store.sync() == SyncReport()  # a rejected file is not fetched again until it changes
        assert sorted(p.name for p in store.root.iterdir()) == ["skill.skillpack"]  # no temporary files
        put_shared(shared, "broken", skill)  # fixed in the shared store: picked up
        assert await store.sync() == SyncReport(added=["broken"])

        small = make_store(shared, tmp_path / "mirror-small", engine_a, fp, max_upload_bytes=len(skill) - 1)
        assert await small.sync() == SyncReport(rejected=["broken", "skill"])
        assert list(small.root.iterdir()) == []

    asyncio.run(scenario())


def test_deleting_a_pack_no_replica_has_is_a_404_naming_it(engines, shared, tmp_path):
    (engine_a, _), fp = engines
    store = make_store(shared, tmp_path / "mirror", engine_a, fp)
    with pytest.raises(DomainError, match="`ghost` does not exist") as info:
        asyncio.run(store.delete("ghost"))
    assert status_of(info.value) == 404


def test_a_failed_publish_is_a_503_and_the_next_sync_restores_the_shared_state(engines, tmp_path, pack_files):
    (engine_a, _), fp = engines
    shared = tmp_path / "shared"
    store = make_store(str(shared), tmp_path / "mirror", engine_a, fp)
    shared.rmdir()
    shared.write_bytes(b"")  # the shared folder is gone (a file in its place): every write into it fails
    with pytest.raises(DomainError, match="could not be written to the shared pack store") as info:
        asyncio.run(upload(store, pack_files["skill"].read_bytes(), "skill"))
    assert status_of(info.value) == 503
    shared.unlink()
    shared.mkdir()
    assert asyncio.run(store.sync()) == SyncReport(removed=["skill"])  # the shared store never got it
    assert_in_step(store, str(shared))


def test_router_examples_are_refused_not_dropped(engines, shared, tmp_path, pack_files):
    """Replicas do not share examples sidecars yet: an upload with examples, or a PUT, is a 501
    that says so, and neither the mirror nor the shared store changes."""
    (engine_a, _), fp = engines
    store = make_store(shared, tmp_path / "mirror", engine_a, fp)
    examples = store.check_examples(b'{"prompt": "2 plus 2 is"}\n')
    staging = store.staging()
    staging.write(pack_files["skill"].read_bytes())
    for attempt in (store.commit(staging, "skill", examples), store.put_examples("skill", examples)):
        with pytest.raises(DomainError, match="does not carry router examples") as info:
            asyncio.run(attempt)
        assert status_of(info.value) == 501
    assert list(store.root.iterdir()) == [] and shared_files(shared) == {}
