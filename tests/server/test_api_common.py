"""Shared by the API tests: a pack built from a tiny pair, a served app, SSE parsing, store snapshots.

(It holds no tests itself; the name keeps it with the API tests it serves. The fixtures
built from these helpers are in tests/server/conftest.py.)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from skillpack_kernels.factors import LowRankDelta
from skillpack_server.app import create_app
from skillpack_server.settings import Settings
from skillpacks.checkpoint import open_checkpoint
from skillpacks.compress import Recipe, compress_with_recipe
from skillpacks.deltas import ExactDelta, ModuleRecord, SparseDelta
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import write_pack
from skillpacks.module_kinds import module_kind

ADMIN_TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
METHODS = {LowRankDelta: "lowrank", SparseDelta: "sparse", ExactDelta: "exact"}


def build_pack(pair, out: Path, name: str, scale: float = 1.0) -> Path:
    """A pack of the real (tuned − base) delta of a tiny pair, compressed with the default recipe.

    `scale` multiplies the delta, so one pair gives packs that steer the model differently.
    """
    base, tuned = open_checkpoint(pair.base), open_checkpoint(pair.tuned)
    deltas, records = {}, []
    for tname in base.names():
        delta = (tuned.get(tname).float() - base.get(tname).float()) * scale
        kind = module_kind(tname)
        compressed, stats = compress_with_recipe(kind, delta, Recipe())
        deltas[tname] = compressed
        records.append(ModuleRecord(tname, kind, METHODS[type(compressed)], list(delta.shape), stats))
    write_pack(out, name, f"test pack {name}", base_fingerprint(base), deltas, records, {"tool": "tests"})
    return out


def settings_for(pair, packs_dir: Path, **overrides) -> Settings:
    values = dict(base=pair.base, packs=packs_dir, device="cpu", dtype="float32", max_batch=4,
                  max_model_len=128, admin_token=ADMIN_TOKEN)
    return Settings(**(values | overrides))


@contextmanager
def serve(settings: Settings, engine_factory=None):
    """A TestClient running the app's lifespan (engine, pack store) for the block."""
    with TestClient(create_app(settings, engine_factory), raise_server_exceptions=False) as client:
        yield client


@contextmanager
def live_server(settings: Settings):
    """The app under a real uvicorn on 127.0.0.1 and a free port, in a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def parse_sse(text: str) -> list:
    """The `data:` payloads of an event stream, JSON-decoded ([DONE] stays a string)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in a folder (hidden ones too) with its bytes: 'unchanged' means equal snapshots."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own log-softmax of each token given the ones before it (ids[1:])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
