"""`GET /v1/models` and `GET /v1/models/{id}`: the base model, every pack built on it, and
`auto` (the router, docs/FUSION.md) when the pack folder holds a router or example prompts."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from skillpack_server.dependencies import get_engine
from skillpack_server.engine.types import EngineProtocol
from skillpack_server.errors import model_not_found
from skillpack_server.pack_selection import AUTO_MODEL
from skillpack_server.schemas.models import ModelCard, ModelList
from skillpacks.classifier import CLASSIFIER_FILE

router = APIRouter(tags=["models"])
OWNER = "skillpack"


def _cards(request: Request, engine: EngineProtocol) -> list[dict]:
    created = request.app.state.started
    base = engine.model_id
    cards = [{"id": base, "object": "model", "created": created, "owned_by": OWNER, "parent": None, "root": base}]
    for status in sorted(engine.pack_cache.status(), key=lambda s: s.name):
        cards.append({"id": status.name, "object": "model", "created": created, "owned_by": OWNER,
                      "parent": base, "root": base})
    if _routable(request, [c["id"] for c in cards[1:]]):
        cards.append({"id": AUTO_MODEL, "object": "model", "created": created, "owned_by": OWNER,
                      "parent": base, "root": base})
    return cards


def _routable(request: Request, packs: list[str]) -> bool:
    """`model: auto` can answer (or build its router on first use): a router file or a
    registered pack's example prompts sit in a pack folder."""
    store = request.app.state.pack_store
    if store is None or not packs:
        return False
    return (any((folder / CLASSIFIER_FILE).is_file() for folder in store.classifier_sources())
            or any(store.examples_path(n).is_file() for n in packs))


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineProtocol = Depends(get_engine)):
    return {"object": "list", "data": _cards(request, engine)}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, engine: EngineProtocol = Depends(get_engine)):
    for card in _cards(request, engine):
        if card["id"] == model_id:
            return card
    raise model_not_found(model_id)
