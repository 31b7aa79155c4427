"""Replicas on Ray Serve: the same app and engine per replica, requests routed to the replica holding their pack.

Each replica is one `create_app` (one base model on one device) behind `@serve.ingress`.
The pack name is Ray's multiplexed model id: Ray's proxy reads it from the
`serve_multiplexed_model_id` request header and prefers a replica that already loaded
that pack; the replica's loader (`@serve.multiplexed`) brings the pack into its pack
cache. All replicas share one pack store (`skillpack_server.pack_store_remote.SharedPackStore`).

Ray is imported only when a deployment is built, so the rest of this module (config,
middleware) works without it.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI

from skillpack_server.app import create_app
from skillpack_server.pack_store_remote import SharedPackStore
from skillpack_server.settings import EngineSettings, ScaleSettings, Settings

log = logging.getLogger("skillpack.server")

REPLICA_HEADER = "x-skillpack-replica"
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray's proxy routes on it ('-' for '_' works too)
DEPLOYMENT_NAME = "SkillPackReplica"
LISTING_ROUTES = {("GET", "/v1/models"), ("GET", "/admin/skillpacks")}
PACK_ROUTE_PREFIX = "/admin/skillpacks/"

PackLoader = Callable[[str], Awaitable[Any]]


def replica_gpus(settings: Settings, cluster_gpus: float) -> float:
    """GPUs each replica reserves: one device per replica when it runs on CUDA."""
    if settings.scale.num_gpus is not None:
        return settings.scale.num_gpus
    device = settings.engine.device
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and cluster_gpus > 0 else 0


def deployment_options(settings: Settings, cluster_gpus: float) -> dict[str, Any]:
    """The Ray Serve deployment options for these settings (`Deployment.options(**...)`)."""
    scale, max_batch = settings.scale, settings.engine.max_batch
    max_ongoing = scale.max_ongoing_requests or 2 * max_batch  # a running batch and one waiting
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": replica_gpus(settings, cluster_gpus)},
        "max_ongoing_requests": max_ongoing,
    }
    if scale.replicas is not None:
        options["num_replicas"] = scale.replicas
        return options
    # continuous batching serves up to max_batch rows at nearly the cost of one: scale out past that
    target = scale.target_ongoing_requests or float(max_batch)
    if target > max_ongoing:
        raise ValueError(f"target_ongoing_requests={target} is above max_ongoing_requests={max_ongoing}; "
                         "a replica could never reach its target.")
    options["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                     "target_ongoing_requests": target}
    return options


def replica_settings(settings: Settings, gpus: float, mirror: Path) -> Settings:
    """The replica's own settings: its mirror as the pack folder, and the device Ray gave it."""
    # Ray sets CUDA_VISIBLE_DEVICES per replica: its one GPU is `cuda`, and a replica that
    # reserved none must not take one
    device = "cuda" if gpus > 0 else ("cpu" if settings.engine.device == "auto" else settings.engine.device)
    engine = settings.engine.model_copy(update={"device": device})
    return settings.model_copy(update={"packs": mirror, "engine": engine})


def shared_store_of(settings: Settings) -> str:
    """The shared store's location, local paths made absolute (replicas do not share the driver's cwd)."""
    where = settings.scale.shared_store or str(settings.packs)
    return where if "://" in where else str(Path(where).resolve())


# ---- what runs inside a replica ---------------------------------------------------------

def share_pack_store(app: FastAPI, shared: str, rescan_seconds: float) -> None:
    """Swap the app's pack store for a `SharedPackStore` after its lifespan starts, and rescan periodically.

    The app's own lifespan builds a plain store on `settings.packs` (the replica's mirror);
    this wraps that lifespan rather than changing it, so one process serves exactly as before.
    """
    start_app = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(inner_app):
        async with start_app(inner_app) as state:
            local = app.state.pack_store
            store = SharedPackStore(shared, local.root, local.pack_cache, local.base_fingerprint,
                                    local.max_upload_bytes, local.max_examples_bytes, readonly=local.readonly)
            await store.sync()
            app.state.pack_store = store
            rescans = asyncio.create_task(_rescan(store, rescan_seconds))
            try:
                yield state
            finally:
                rescans.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescans

    app.router.lifespan_context = lifespan


async def _rescan(store: SharedPackStore, every_seconds: float) -> None:
    while True:
        await asyncio.sleep(every_seconds)
        try:
            await store.sync()
        except Exception as exc:  # noqa: BLE001  any client's error: the store is unreachable for now,
            log.warning("pack store rescan of %s failed: %s", store.shared, exc)  # keep serving the mirror


def multiplex_header(scope: dict) -> str:
    """The pack id a client or gateway put in Ray's routing header ('' when absent)."""
    for key, value in scope.get("headers", ()):
        if key.decode("latin-1").lower().replace("-", "_") == MULTIPLEX_HEADER:
            return value.decode("latin-1")
    return ""


class PackAffinity:
    """ASGI middleware on each replica: sync the store on a miss, load the request's pack, name the replica.

    Before the app sees a request it (1) collects the pack names the request refers to
    (JSON body `model` and `skillpacks[].name` of /v1 POSTs, the admin route's name) and
    syncs the shared store when one is unknown here, or when the request lists packs;
    (2) calls the replica's multiplexed loader for the routing pack (Ray's model id, else
    the body's `model`), which is what tells Ray this replica now holds it; (3) adds
    `X-SkillPack-Replica` to the response.
    """

    def __init__(self, app, state, replica: str, load_pack: PackLoader,
                 requested_pack: Callable[[dict], str] = multiplex_header):
        self.app, self.state, self.replica = app, state, replica
        self.load_pack, self.requested_pack = load_pack, requested_pack

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        replayed, body_packs = await self._peek(scope, receive)
        await self._prepare(scope, body_packs)

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), self.replica.encode())]}
            await send(message)

        await self.app(scope, replayed, named_send)

    async def _peek(self, scope, receive) -> tuple[Callable, list[str]]:
        """Read a /v1 POST body (bounded by the app's body limit) and give back a receive that replays it."""
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return receive, []
        limit = self.state.settings.max_body_bytes
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body") or size > limit:
                break
        complete = not messages[-1].get("more_body") and size <= limit

        async def replay():
            return messages.pop(0) if messages else await receive()

        body = b"".join(m.get("body", b"") for m in messages) if complete else b""
        return replay, packs_named_in(body)

    async def _prepare(self, scope, body_packs: list[str]) -> None:
        engine, store = self.state.engine, self.state.pack_store
        if engine is None or not isinstance(store, SharedPackStore):
            return  # still starting: the app answers 503 itself
        routing = self.requested_pack(scope) or (body_packs[0] if body_packs else "")
        names = {*body_packs, routing}
        if scope["path"].startswith(PACK_ROUTE_PREFIX):
            names.add(scope["path"][len(PACK_ROUTE_PREFIX):].split("/", 1)[0])
        names -= {engine.model_id, ""}
        known = set(engine.pack_cache.names())
        if (scope["method"], scope["path"].rstrip("/")) in LISTING_ROUTES or names - known:
            try:
                await store.sync()
            except Exception as exc:  # noqa: BLE001  unreachable store: the request runs on what is mirrored
                log.warning("pack store sync from %s failed: %s", store.shared, exc)
            known = set(engine.pack_cache.names())
        if routing in known:
            try:
                await self.load_pack(routing)
            except Exception as exc:  # noqa: BLE001  the engine loads it (or says why) when the request runs
                log.warning("could not preload pack %s: %s", routing, exc)


def packs_named_in(body: bytes) -> list[str]:
    """`model` first, then each `skillpacks[].name`, of a JSON request body; [] when it is not one."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict):
        return []
    names = [data["model"]] if isinstance(data.get("model"), str) else []
    mix = data.get("skillpacks")
    if isinstance(mix, list):
        names += [ref["name"] for ref in mix if isinstance(ref, dict) and isinstance(ref.get("name"), str)]
    return names


def pack_cache_loader(state) -> PackLoader:
    """The replica's multiplexed loader: bring the pack into the engine's pack cache (onto the device)."""

    async def load_pack(name: str) -> str:
        # Ray keeps the returned token in its own LRU (packs_per_replica) to know what this
        # replica holds; the pack cache's LRU still decides what stays on the device
        await anyio.to_thread.run_sync(state.engine.pack_cache.load, name)
        return name

    return load_pack


def replica_app(settings: Settings, shared: str, rescan_seconds: float, replica: str,
                wrap_loader: Callable[[PackLoader], PackLoader] = lambda loader: loader,
                requested_pack: Callable[[dict], str] = multiplex_header) -> FastAPI:
    """One replica's app: the single-process app on a shared store, with pack affinity.

    `wrap_loader` turns the pack-cache loader into the one requests call (Ray's
    `serve.multiplexed`); the result is kept as `app.state.load_pack`.
    """
    app = create_app(settings)
    app.state.load_pack = wrap_loader(pack_cache_loader(app.state))
    share_pack_store(app, shared, rescan_seconds)
    app.add_middleware(PackAffinity, state=app.state, replica=replica, load_pack=app.state.load_pack,
                       requested_pack=requested_pack)
    return app


# ---- the Ray Serve deployment -------------------------------------------------------------

@functools.cache
def replica_deployment():
    """The `@serve.ingress` deployment class (built on first use: Ray is imported here)."""
    from ray import serve  # the optional `ray` extra: imported only by --ray

    class SkillPackReplica:
        """One base model on one device, serving the whole API; Ray routes each pack's requests here."""

        def __init__(self, settings_fields: dict, gpus: float):
            settings = Settings(**settings_fields)
            self.replica = serve.get_replica_context().replica_id.unique_id
            # its own folder even when replicas share a node and a mirror parent; removed when it stops
            mirror = Path(tempfile.mkdtemp(prefix=f"skillpack-mirror-{self.replica}-", dir=settings.scale.mirror))
            self.settings = replica_settings(settings, gpus, mirror)
            self.served_app: FastAPI | None = None

        def __serve_build_asgi_app__(self) -> FastAPI:
            scale = self.settings.scale
            packs = scale.packs_per_replica or self.settings.engine.pack_slots
            self.served_app = replica_app(
                self.settings, scale.shared_store, scale.rescan_seconds, self.replica,
                wrap_loader=serve.multiplexed(max_num_models_per_replica=packs),
                requested_pack=lambda scope: serve.get_multiplexed_model_id())
            self.load_pack = self.served_app.state.load_pack  # where Ray looks for a multiplexed loader
            return self.served_app

        def check_health(self) -> None:
            if self.served_app is not None and self.served_app.state.engine is None:
                raise RuntimeError(f"replica {self.replica} has no engine (it failed to start or has stopped)")

        def __del__(self):
            shutil.rmtree(self.settings.packs, ignore_errors=True)

    return serve.deployment(serve.ingress()(SkillPackReplica))


def build_application(settings: Settings, cluster_gpus: float = 0.0):
    """The Ray Serve application (`serve.run(...)` it): replicas configured from `settings`."""
    settings.check_admin_auth()
    options = deployment_options(settings, cluster_gpus)
    gpus = options["ray_actor_options"]["num_gpus"]
    fields = settings.model_dump(mode="json")
    if settings.base is not None:
        fields["base"] = str(settings.base.resolve())
    fields["scale"]["shared_store"] = shared_store_of(settings)
    return replica_deployment().options(**options).bind(fields, gpus)


def app_builder(args: dict[str, Any]):
    """`serve run skillpack_server.ray_serve:app_builder key=value ...` (or a serve config's `args`).

    Keys are Settings fields (base, packs, device, ...) and its Ray scaling fields (replicas,
    min_replicas, ...); anything not given comes from SKILLPACK_* / SKILLPACK_RAY_* env vars.
    """
    scale_keys = set(ScaleSettings.model_fields)
    unknown = set(args) - scale_keys - set(Settings.model_fields) - set(EngineSettings.model_fields)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; expected Settings or ScaleSettings fields.")
    settings = Settings(**{k: v for k, v in args.items() if k not in scale_keys},
                        scale={k: v for k, v in args.items() if k in scale_keys})
    import ray  # the optional `ray` extra: imported only by --ray

    return build_application(settings, ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0)


def serve_on_ray(settings: Settings) -> int:
    """`skillpack serve --ray`: join the Ray cluster (or start a local one) and run the replicas until Ctrl-C."""
    try:
        deployment_options(settings, 0.0)  # refuse bad combinations before starting anything
    except ValueError as exc:
        print(f"skillpack serve --ray: {exc}", file=sys.stderr)
        return 2
    import ray  # the optional `ray` extra: imported only by --ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"))
    try:
        app = build_application(settings, ray.cluster_resources().get("GPU", 0))
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=settings.scale.app_name, route_prefix=settings.scale.route_prefix, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
