"""`/admin/skillpacks`: upload, list, inspect, delete, load, unload, pin and unpin packs, and
put, get or delete a pack's router examples."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request, Response

from skillpack_server.dependencies import get_engine, get_pack_store
from skillpack_server.engine.types import EngineProtocol
from skillpack_server.errors import APIError
from skillpack_server.pack_store import PackStore, check_pack_name, pack_not_found
from skillpack_server.schemas.admin import DeleteResult, ExamplesResult, PackInfo, PackList, UploadResult
from skillpack_server.upload_stream import receive_examples, receive_pack_upload

router = APIRouter(prefix="/admin/skillpacks", tags=["admin"])


def _status(engine: EngineProtocol, name: str) -> dict:
    for s in engine.pack_cache.status():
        if s.name == name:
            return {"name": s.name, "path": s.path, "bytes": s.bytes, "state": s.state, "pinned": s.pinned,
                    "in_use": s.in_use, "version": s.version}
    raise pack_not_found(name)


def form_bool(fields: dict[str, str], key: str) -> bool:
    """A true/false form field (absent = false)."""
    value = fields.get(key, "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(400, f"The form field `{key}` is {value!r}; expected true or false.", param=key)
    return value in ("true", "1")


async def _refresh_pack_selector(request: Request) -> None:
    """A pack or its examples changed: the `auto` pack selection, if in use, checks its
    classifier now and, if stale, starts its background rebuild (the check every `auto` request runs)."""
    selector = request.app.state.pack_selector
    if selector is not None:
        await anyio.to_thread.run_sync(selector.refresh)  # hashes changed files: off the loop


@router.post("", response_model=UploadResult, status_code=201)
async def upload_pack(request: Request, store: PackStore = Depends(get_pack_store)):
    staging = store.staging()
    try:
        upload = await receive_pack_upload(request, staging, store.max_examples_bytes,
                                           request.app.state.settings.upload_read_timeout)
        name = upload.fields.get("name") or None
        if name is not None:
            check_pack_name(name)
        replace = form_bool(upload.fields, "replace")
        # checked before the pack: bad examples leave no pack behind
        examples = None if upload.examples is None else await anyio.to_thread.run_sync(
            store.check_examples, upload.examples)
    except BaseException:
        staging.discard()
        raise
    name, manifest, replaced = await store.commit(staging, name, examples, replace=replace)
    await _refresh_pack_selector(request)
    return {"name": name, "replaced": replaced, "bytes": staging.size, "manifest": manifest,
            "examples": None if examples is None else examples.info()}


@router.get("", response_model=PackList)
async def list_packs(engine: EngineProtocol = Depends(get_engine)):
    statuses = sorted(engine.pack_cache.status(), key=lambda s: s.name)
    return {"object": "list", "data": [_status(engine, s.name) for s in statuses]}


@router.get("/{name}")
async def get_pack(name: str, store: PackStore = Depends(get_pack_store), engine: EngineProtocol = Depends(get_engine)):
    manifest = store.manifest(name)
    return {"name": name, "status": _status(engine, name), "manifest": manifest}


@router.delete("/{name}", response_model=DeleteResult)
async def delete_pack(name: str, request: Request, store: PackStore = Depends(get_pack_store)):
    await store.delete(name)
    await _refresh_pack_selector(request)
    return {"name": name, "deleted": True}


@router.put("/{name}/examples", response_model=ExamplesResult)
async def put_examples(name: str, request: Request, store: PackStore = Depends(get_pack_store)):
    check_pack_name(name)
    if not store.is_registered(name):  # before reading a body that could not be used
        raise pack_not_found(name)
    data = await receive_examples(request, store.max_examples_bytes, request.app.state.settings.upload_read_timeout)
    examples = await anyio.to_thread.run_sync(store.check_examples, data)
    replaced = await store.put_examples(name, examples)
    await _refresh_pack_selector(request)
    return {"name": name, "replaced": replaced, "examples": examples.info()}


@router.get("/{name}/examples")
async def get_examples(name: str, store: PackStore = Depends(get_pack_store)):
    data = await anyio.to_thread.run_sync(store.read_examples, name)
    return Response(data, media_type="application/jsonl")


@router.delete("/{name}/examples", response_model=DeleteResult)
async def delete_examples(name: str, request: Request, store: PackStore = Depends(get_pack_store)):
    await store.delete_examples(name)
    await _refresh_pack_selector(request)
    return {"name": name, "deleted": True}


async def _cache_action(name: str, engine: EngineProtocol, action) -> dict:
    check_pack_name(name)
    _status(engine, name)  # 404 before asking the cache
    # loading reads and places a pack: off the event loop (the cache has its own lock);
    # the cache's refusals are domain errors (PackNotFound, PackInUse, EngineUnavailable, ...)
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
