"""The FastAPI application: builds the engine and pack store in lifespan and assembles the routers."""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from skillpack_server.auth import require_admin, require_api_key
from skillpack_server.engine.engine import Engine
from skillpack_server.engine.types import EngineProtocol
from skillpack_server.errors import error_response, install_error_handlers
from skillpack_server.metrics import Metrics
from skillpack_server.openapi import install_openapi
from skillpack_server.pack_store import PackStore
from skillpack_server.routers import admin, chat, completions, health, models
from skillpack_server.settings import Settings, get_settings
from skillpacks.default_base import default_base_dir
from skillpacks.hub import resolve_checkpoint

log = logging.getLogger("skillpack.server")

EngineFactory = Callable[[Settings], EngineProtocol]
UPLOAD_ROUTE = "/admin/skillpacks"
EXAMPLES_ROUTE_SUFFIX = "/examples"  # PUT /admin/skillpacks/{name}/examples
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around an upload's file bytes


def base_dir(settings: Settings) -> Path:
    if settings.base is not None:
        return resolve_checkpoint(settings.base)  # a folder, or a Hugging Face model id from its cache
    return default_base_dir()


def default_engine(settings: Settings) -> EngineProtocol:
    return Engine(base_dir(settings), settings.engine)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    engine: EngineProtocol = app.state.engine_factory(settings)
    store = PackStore(settings.packs, engine.pack_cache, engine.base_fingerprint,
                      settings.max_upload_bytes, settings.max_examples_bytes, readonly=settings.readonly_packs)
    store.register_all()
    app.state.engine, app.state.pack_store = engine, store
    log.info("serving %s with %d pack(s)", engine.model_id, len(engine.pack_cache.status()))
    # Everything built so far (torch, transformers, the model's modules) lives as long as the
    # server: frozen, full collections stop rescanning it. They ran while a pack load made its
    # thousands of small objects and took half of its time (docs/SERVING.md).
    gc.freeze()
    try:
        yield
    finally:
        app.state.engine = app.state.pack_store = None
        engine.close()
        gc.unfreeze()  # collectable again: a process that starts several apps (tests) keeps no garbage


class BodyLimit:
    """Refuses bodies over the limit with 413 while they stream (Content-Length first, then counted).

    Pack uploads and router examples get their own limits; everything else gets `max_body_bytes`.
    """

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    def _limit(self, scope) -> int:
        path = scope["path"].rstrip("/")
        if scope["method"] == "POST" and path == UPLOAD_ROUTE:
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        if scope["method"] == "PUT" and path.startswith(f"{UPLOAD_ROUTE}/") and path.endswith(EXAMPLES_ROUTE_SUFFIX):
            return self.settings.max_examples_bytes
        return self.settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(413, _too_large(limit), code="body_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # the app's error handler turns this into the 413 envelope
                    raise StarletteHTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted_receive, send)


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes."


class RequestMetrics:
    """Counts every response by route template (not raw path: bounded label values) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The app. Tests pass their own settings (and, for HTTP-only checks, an engine factory)."""
    settings = settings or get_settings()
    settings.check_admin_auth()
    app = FastAPI(title="SkillPack Server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine_factory = engine_factory or default_engine
    app.state.engine = app.state.pack_store = None
    app.state.pack_selector = app.state.grammars = None  # built on first use (`model: auto`, structured output)
    app.state.started = int(time.time())
    app.state.metrics = Metrics(lambda: app.state.engine)
    install_error_handlers(app)

    inference = [Depends(require_api_key)]
    app.include_router(completions.router, dependencies=inference)
    app.include_router(chat.router, dependencies=inference)
    app.include_router(models.router, dependencies=inference)
    app.include_router(admin.router, dependencies=[Depends(require_admin)])
    app.include_router(health.router)
    routers = (completions.router, chat.router, models.router, admin.router, health.router)
    app.state.route_methods = [(route.path_regex, route.methods) for router in routers for route in router.routes] + [
        (route.path_regex, route.methods) for route in app.router.routes if getattr(route, "methods", None)]

    install_openapi(app, api_key=bool(settings.api_key), admin_auth=not settings.no_admin_auth)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    return app
