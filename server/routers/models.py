"""`GET /v1/models` and `GET /v1/models/{id}`: the base model and every pack built on it."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.engine.types import EngineProtocol
from server.errors import model_not_found
from server.routers.deps import get_engine
from server.schemas.models import ModelCard, ModelList

router = APIRouter(tags=["models"])
OWNER = "skillpack"


def _cards(request: Request, engine: EngineProtocol) -> list[dict]:
    created = request.app.state.started
    base = engine.model_id
    cards = [{"id": base, "object": "model", "created": created, "owned_by": OWNER, "parent": None, "root": base}]
    for status in sorted(engine.pack_cache.status(), key=lambda s: s.name):
        cards.append({"id": status.name, "object": "model", "created": created, "owned_by": OWNER,
                      "parent": base, "root": base})
    return cards


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineProtocol = Depends(get_engine)):
    return {"object": "list", "data": _cards(request, engine)}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, engine: EngineProtocol = Depends(get_engine)):
    for card in _cards(request, engine):
        if card["id"] == model_id:
            return card
    raise model_not_found(model_id)
