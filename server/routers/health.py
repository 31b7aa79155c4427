"""`GET /health` (liveness and readiness) and `GET /metrics` (Prometheus text format)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request):
    engine = request.app.state.engine
    if engine is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return {"status": "ok", "model": engine.model_id, "packs": len(engine.pack_cache.status())}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
