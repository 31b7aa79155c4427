"""Faults: SIGKILL mid-upload and mid-generation, a crash at every step of an upload's commit,
a full disk, and pack files corrupted on disk. After each, the store holds only complete,
valid packs, every pack stored before the fault is served, and the server stays up."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import skillpack_server.pack_store as pack_store
from skillpack_server.pack_store import TEMP_PREFIX, PackStore
from skillpacks.checkpoint import open_checkpoint
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import verify_pack
from testbed.load import ADMIN_TOKEN, Reference, ServerProcess
from tests.server.test_api_common import ADMIN, serve, settings_for, snapshot

PROMPT = [5, 17, 99, 3, 250, 11, 7, 42]


def multipart(data: bytes, name: str) -> tuple[bytes, str]:
    boundary = "reliability-boundary-7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.skillpack\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def half_upload(url: str, data: bytes, name: str) -> socket.socket:
    """Send the headers and half the body of an upload, then stall (the socket stays open)."""
    body, content_type = multipart(data, name)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /admin/skillpacks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def served_greedy(url: str, model: str) -> tuple[str, list[float]]:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def assert_matches(got: tuple[str, list[float]], want: tuple[str, list[float]]) -> None:
    assert got[0] == want[0]
    assert len(got[1]) == len(want[1]) and all(abs(a - b) < 1e-3 for a, b in zip(got[1], want[1]))


def test_sigkill_mid_upload_and_mid_generation_loses_nothing(pair, pack_paths, pack_bytes, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(pack_paths["steady-a"], store / "steady-a.skillpack")  # there before the server started
    reference = Reference(pair.base, {"steady-a": pack_paths["steady-a"], "skill": pack_paths["skill"]})
    server = ServerProcess(pair.base, store, tmp_path / "server.log")
    url = server.start()
    stalled = []
    try:
        r = httpx.post(f"{url}/admin/skillpacks", files={"file": ("p", pack_bytes["skill"])},
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        assert r.status_code == 201, r.text
        expected = snapshot(store)
        assert sorted(expected) == ["skill.skillpack", "steady-a.skillpack"]

        streamed, stream_ended = [], threading.Event()

        def generate():  # a long generation on the pack that is about to be replaced
            try:
                with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                        "model": "skill", "prompt": PROMPT, "max_tokens": 110, "stream": True}) as s:
                    for line in s.iter_lines():
                        streamed.append(line)
            except httpx.HTTPError:
                pass
            stream_ended.set()

        threading.Thread(target=generate, daemon=True).start()
        wait_for(lambda: any(line.startswith("data: {") for line in streamed), "the first streamed token")
        stalled = [half_upload(url, pack_bytes["steady-b"], "brand-new"),
                   half_upload(url, pack_bytes["steady-c"], "skill")]  # a replacement of a served pack
        wait_for(lambda: len([p for p in store.iterdir() if p.name.startswith(TEMP_PREFIX)
                              and p.stat().st_size > 0]) == 2, "both uploads to be half written")
        assert not stream_ended.is_set(), "the generation finished before the kill; make it longer"
        server.kill()
        stream_ended.wait(30)
        assert "data: [DONE]" not in streamed  # it really was cut off mid-generation
    finally:
        for sock in stalled:
            sock.close()
        server.kill()

    url = server.start()
    try:
        assert snapshot(store) == expected  # half uploads gone, the replaced pack's old bytes intact
        listed = httpx.get(f"{url}/admin/skillpacks", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert [p["name"] for p in listed["data"]] == ["skill", "steady-a"]
        for name in ("skill", "steady-a"):
            verify_pack(store / f"{name}.skillpack", base_fingerprint(open_checkpoint(pair.base)))
            assert_matches(served_greedy(url, name), reference.greedy(((name, 1.0),), PROMPT, 6))
    finally:
        server.stop()


# ---- a crash at each step of committing an upload -------------------------------------------

class Registry:
    """The pack cache's bookkeeping only (PackCacheProtocol's register/unregister)."""

    def __init__(self):
        self.paths: dict[str, str] = {}

    def register(self, name: str, path: str, verified: bool = False) -> None:
        self.paths[name] = path

    def unregister(self, name: str) -> None:
        self.paths.pop(name)


class Crash(BaseException):
    """Stands for the process dying: raised after the disk's state at that instant is imaged."""


# the steps of writing a new pack, in order; a replacement also links and drops a rollback copy
NEW_STEPS = ["write", "fsync", "replace", "fsync_dir", "register"]
REPLACE_STEPS = ["write", "fsync", "link", "replace", "fsync_dir", "register", "unlink_backup"]
AFTER_RENAME = ("fsync_dir", "register", "unlink_backup")  # the new bytes are in place from here on


@pytest.mark.parametrize("replacing,point", [(False, p) for p in NEW_STEPS] + [(True, p) for p in REPLACE_STEPS])
def test_a_crash_at_any_step_of_a_commit_leaves_old_or_new_never_half(pair, pack_bytes, tmp_path, monkeypatch,
                                                                      point, replacing):
    root, image = tmp_path / "store", tmp_path / "image"
    root.mkdir()
    fingerprint = base_fingerprint(open_checkpoint(pair.base))
    old, new = pack_bytes["steady-a"], pack_bytes["steady-b"]
    if replacing:
        (root / "p.skillpack").write_bytes(old)

    def crash_here():
        shutil.copytree(root, image)  # what a restart would find on disk
        raise Crash(point)

    def crashing(target, name):
        def wrapper(*args, **kwargs):
            if point == name:
                crash_here()
            return target(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pack_store.os, "fsync", crashing(os.fsync, "fsync"))
    monkeypatch.setattr(pack_store.os, "link", crashing(os.link, "link"))
    monkeypatch.setattr(pack_store.os, "replace", crashing(os.replace, "replace"))
    monkeypatch.setattr(pack_store, "_fsync_dir", crashing(pack_store._fsync_dir, "fsync_dir"))
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if point == "unlink_backup" and self.name.endswith(pack_store.BACKUP_SUFFIX) and self.exists():
            crash_here()
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    registry = Registry()
    if point == "register":
        registry.register = lambda name, path, verified=False: crash_here()
    store = PackStore(root, registry, fingerprint, max_upload_bytes=len(new) + 1)
    staging = store.staging()
    with pytest.raises(Crash):
        staging.write(new[:1000])
        if point == "write":
            crash_here()
        staging.write(new[1000:])
        asyncio.run(store.commit(staging, "p", replace=True))
    monkeypatch.undo()

    restarted = Registry()
    registered = PackStore(image, restarted, fingerprint, max_upload_bytes=len(new)).register_all()
    left = snapshot(image)
    assert not [n for n in left if n.startswith(TEMP_PREFIX)]  # no half upload or rollback copy survives
    if replacing or point in AFTER_RENAME:
        assert registered == ["p"] and sorted(left) == ["p.skillpack"]
        assert left["p.skillpack"] == (new if point in AFTER_RENAME else old)
        verify_pack(image / "p.skillpack", fingerprint)
    else:
        assert registered == [] and left == {}


# ---- a full disk ---------------------------------------------------------------------------

class FullDisk:
    """A file object that accepts `room` bytes, then fails like a full disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["create", "write", "fsync", "rename"])
def test_a_full_disk_fails_the_upload_cleanly(pair, pack_bytes, tmp_path, monkeypatch, where):
    store = tmp_path / "store"
    store.mkdir()
    (store / "skill.skillpack").write_bytes(pack_bytes["skill"])
    with serve(settings_for(pair, store)) as client:
        before = snapshot(store)
        first = client.post("/v1/completions", json={"model": "skill", "prompt": PROMPT, "max_tokens": 4,
                                                     "temperature": 0}).json()
        with monkeypatch.context() as patch:
            if where == "create":
                patch.setattr(pack_store.tempfile, "mkstemp", no_space)
            elif where == "write":
                real_fdopen = os.fdopen
                patch.setattr(pack_store.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k), 4096))
            elif where == "fsync":
                patch.setattr(pack_store.os, "fsync", no_space)
            else:
                patch.setattr(pack_store.os, "replace", no_space)
            r = client.post("/admin/skillpacks", files={"file": ("p", pack_bytes["steady-a"])},
                            data={"name": "skill", "replace": "true"}, headers=ADMIN)
        assert r.status_code == 507, r.text
        message = r.json()["error"]["message"]
        assert "No space left on device" in message and "nothing was stored" in message
        assert snapshot(store) == before  # no temporary file, no backup, the old version intact
        again = client.post("/v1/completions", json={"model": "skill", "prompt": PROMPT, "max_tokens": 4,
                                                     "temperature": 0}).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        r = client.post("/admin/skillpacks", files={"file": ("p", pack_bytes["steady-a"])}, headers=ADMIN)
        assert r.status_code == 201, r.text  # with the disk back, uploads work again


# ---- packs corrupted on disk ----------------------------------------------------------------

def flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # in the tensor data: the header still parses, only the checksum can tell
    path.write_bytes(bytes(data))


def test_a_pack_corrupted_before_startup_is_skipped_and_reported(pair, pack_bytes, tmp_path, caplog):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("skill", "steady-a"):
        (store / f"{name}.skillpack").write_bytes(pack_bytes[name])
    flip_payload_byte(store / "steady-a.skillpack")
    with caplog.at_level(logging.WARNING, logger="skillpack.server"), serve(settings_for(pair, store)) as client:
        assert [p["name"] for p in client.get("/admin/skillpacks", headers=ADMIN).json()["data"]] == ["skill"]
        assert client.post("/v1/completions", json={"model": "skill", "prompt": PROMPT}).status_code == 200
        r = client.post("/v1/completions", json={"model": "steady-a", "prompt": PROMPT})
        assert r.status_code == 404 and "steady-a" in r.json()["error"]["message"]
    assert any("steady-a.skillpack" in rec.getMessage() and "checksum mismatch" in rec.getMessage()
               for rec in caplog.records)
    assert (store / "steady-a.skillpack").exists()  # reported, never deleted: the operator decides


def test_a_pack_corrupted_while_serving_is_refused_at_load(pair, pack_bytes, tmp_path, caplog):
    store = tmp_path / "store"
    store.mkdir()
    for name in ("skill", "steady-a"):
        (store / f"{name}.skillpack").write_bytes(pack_bytes[name])
    with caplog.at_level(logging.WARNING), serve(settings_for(pair, store)) as client:
        flip_payload_byte(store / "steady-a.skillpack")  # after the startup scan, before its first load
        for attempt in range(2):  # refused every time, not cached as good after the first failure
            r = client.post("/v1/completions", json={"model": "steady-a", "prompt": PROMPT, "max_tokens": 4})
            assert r.status_code == 500, r.text
            message = r.json()["error"]["message"]
            assert "steady-a" in message and "checksum mismatch" in message
        r = client.post("/admin/skillpacks/steady-a/load", headers=ADMIN)
        assert r.status_code == 500 and "checksum mismatch" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "skill", "prompt": PROMPT}).status_code == 200
        assert client.get("/health").json()["status"] == "ok"
    assert any("steady-a" in rec.getMessage() and "checksum mismatch" in rec.getMessage()
               for rec in caplog.records)


def test_a_unreadable_temp_leftover_does_not_stop_startup(pair, pack_bytes, tmp_path):
    """Leftovers of a crash (a half upload, a rollback copy) are removed at startup."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "skill.skillpack").write_bytes(pack_bytes["skill"])
    (store / f"{TEMP_PREFIX}abc.part").write_bytes(pack_bytes["steady-a"][:5000])
    (store / f"{TEMP_PREFIX}skill{pack_store.BACKUP_SUFFIX}").write_bytes(pack_bytes["steady-b"])
    with serve(settings_for(pair, store)) as client:
        assert [p["name"] for p in client.get("/admin/skillpacks", headers=ADMIN).json()["data"]] == ["skill"]
    assert sorted(snapshot(store)) == ["skill.skillpack"]
