"""`/admin/skillpacks`: upload, list, inspect, delete, load, unload, pin and unpin packs."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request

from server.engine.types import EngineProtocol
from server.errors import APIError
from server.pack_store import PackStore, check_pack_name
from server.routers.deps import get_engine, get_pack_store
from server.routers.upload import receive_pack_upload
from server.schemas.admin import DeleteResult, PackInfo, PackList, UploadResult

router = APIRouter(prefix="/admin/skillpacks", tags=["admin"])


def _status(engine: EngineProtocol, name: str) -> dict:
    for s in engine.pack_cache.status():
        if s.name == name:
            return {"name": s.name, "path": s.path, "bytes": s.bytes, "state": s.state, "pinned": s.pinned,
                    "in_use": s.in_use, "version": s.version}
    raise APIError(404, f"The pack `{name}` does not exist.", param="name", code="pack_not_found")


@router.post("", response_model=UploadResult, status_code=201)
async def upload_pack(request: Request, store: PackStore = Depends(get_pack_store)):
    staging = store.staging()
    try:
        fields = await receive_pack_upload(request, staging)
        name = fields.get("name") or None
        if name is not None:
            check_pack_name(name)
    except BaseException:
        staging.discard()
        raise
    name, manifest, replaced = await store.commit(staging, name)
    return {"name": name, "replaced": replaced, "bytes": staging.size, "manifest": manifest}


@router.get("", response_model=PackList)
async def list_packs(engine: EngineProtocol = Depends(get_engine)):
    statuses = sorted(engine.pack_cache.status(), key=lambda s: s.name)
    return {"object": "list", "data": [_status(engine, s.name) for s in statuses]}


@router.get("/{name}")
async def get_pack(name: str, store: PackStore = Depends(get_pack_store), engine: EngineProtocol = Depends(get_engine)):
    manifest = store.manifest(name)
    return {"name": name, "status": _status(engine, name), "manifest": manifest}


@router.delete("/{name}", response_model=DeleteResult)
async def delete_pack(name: str, store: PackStore = Depends(get_pack_store)):
    await store.delete(name)
    return {"name": name, "deleted": True}


async def _cache_action(name: str, engine: EngineProtocol, action) -> dict:
    check_pack_name(name)
    _status(engine, name)  # 404 before asking the cache
    # loading reads and places a pack: off the event loop (the cache has its own lock);
    # the cache's refusals are EngineErrors with their own status (404, 409, 503)
    await anyio.to_thread.run_sync(action)
    return _status(engine, name)


@router.post("/{name}/load", response_model=PackInfo)
async def load_pack(name: str, engine: EngineProtocol = Depends(get_engine)):
    return await _cache_action(name, engine, lambda: engine.pack_cache.load(name))


@router.post("/{name}/unload", response_model=PackInfo)
async def unload_pack(name: str, engine: EngineProtocol = Depends(get_engine)):
    return await _cache_action(name, engine, lambda: engine.pack_cache.unload(name))


@router.post("/{name}/pin", response_model=PackInfo)
async def pin_pack(name: str, engine: EngineProtocol = Depends(get_engine)):
    return await _cache_action(name, engine, lambda: engine.pack_cache.pin(name, True))


@router.post("/{name}/unpin", response_model=PackInfo)
async def unpin_pack(name: str, engine: EngineProtocol = Depends(get_engine)):
    return await _cache_action(name, engine, lambda: engine.pack_cache.pin(name, False))
