"""System 3 over HTTP: the FastAPI app under uvicorn on a local port, driven by streamed completions.

The app is the production one (`skillpack_server.app.create_app`) around an engine the benchmark
built; its pack store is a folder of links to the workload's packs. Each request is an
OpenAI streamed completion of token ids at temperature 0; the time to first token is
the first SSE chunk that carries a choice, and the token count comes from the usage
chunk (the API has no ignore-EOS switch, so a completion may stop early at EOS).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx

from bench.serve_systems import Clock
from bench.serve_workloads import Request, RequestResult

START_TIMEOUT_S = 60


class HttpServer:
    """uvicorn serving `create_app` in a background thread; `close()` stops it (and the engine)."""

    def __init__(self, engine, pack_dir: Path):
        import uvicorn

        from skillpack_server.app import create_app
        from skillpack_server.settings import Settings

        settings = Settings(packs=pack_dir, no_admin_auth=True)
        app = create_app(settings, engine_factory=lambda _settings: engine)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start within {START_TIMEOUT_S} s.")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def link_packs(pack_paths: dict, names: list[str], folder: Path) -> Path:
    """A pack-store folder holding links to just these packs."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.skillpack"):
        old.unlink()
    for name in names:
        (folder / f"{name}.skillpack").symlink_to(Path(pack_paths[name]).resolve())
    return folder


async def _complete(client: httpx.AsyncClient, model: str, request: Request, clock: Clock) -> RequestResult:
    await clock.wait_until(request.arrival)
    body = {"model": model, "prompt": list(request.prompt_ids), "max_tokens": request.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    first, count, pieces = None, 0, []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"request {request.index} got HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices"):
                if first is None:
                    first = clock.now()
                pieces.append(chunk["choices"][0].get("text", ""))
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    # token ids are not streamed; the result keeps one placeholder per generated token
    return RequestResult(request.index, request.arrival, first, clock.now(), [-1] * count, "".join(pieces))


class HttpSystem:
    def __init__(self, server: HttpServer, base_model_id: str):
        self.server, self.base_model_id = server, base_model_id
        self.name = "skillpack-http"
        self.stats: dict = {}

    def run(self, requests: list[Request]) -> list[RequestResult]:
        clock = Clock()

        async def main():
            limits = httpx.Limits(max_connections=len(requests) + 1)
            async with httpx.AsyncClient(base_url=self.server.url, timeout=None, limits=limits) as client:
                clock.start()
                return await asyncio.gather(*[_complete(client, r.pack or self.base_model_id, r, clock)
                                              for r in requests])

        return asyncio.run(main())
