"""Dependencies the routes take: the engine, pack store and metrics the lifespan built."""
from __future__ import annotations

from fastapi import Request

from skillpack_server.engine.types import EngineProtocol
from skillpack_server.errors import APIError
from skillpack_server.metrics import Metrics
from skillpack_server.pack_store import PackStore


def get_engine(request: Request) -> EngineProtocol:
    engine = request.app.state.engine
    if engine is None:
        raise APIError(503, "The model is still loading; retry in a moment.", code="not_ready")
    return engine


def get_pack_store(request: Request) -> PackStore:
    store = request.app.state.pack_store
    if store is None:
        raise APIError(503, "The pack store is not ready yet; retry in a moment.", code="not_ready")
    return store


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics
