"""The OpenAPI document as the API behaves, so generated clients and fuzzers can work from it:
its bearer schemes and which routes need them, the bodies the upload routes read by hand, the
400 envelope where FastAPI would claim 422, the 4xx each route answers, the pack-name pattern,
and `/metrics` as Prometheus text."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from skillpacks.format import PACK_NAME_RE

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
WHY = {
    400: "the request is invalid; `error.param` names the field", 401: "the bearer token is missing or wrong",
    404: "no such model or pack", 405: "the path takes other methods (listed in `Allow`)",
    408: "the upload stalled", 409: "the pack name is taken or read-only", 413: "the body is over its size limit",
    415: "the body is not of the media type the route reads",
    429: "the queue is full; retry", 503: "the model or pack store is not ready yet, or the router is unavailable",
}
PACK_NAME = {"type": "string", "pattern": PACK_NAME_RE.pattern, "minLength": 1, "maxLength": 64}
UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the .skillpack file"},
        "name": {**PACK_NAME, "description": "the name to serve it under (default: the manifest's)"},
        "replace": {"type": "boolean", "default": False, "description": "replace a pack of that name"},
        "examples": {"type": "string", "format": "binary", "description": "router examples (JSON lines)"}}}}}}
# the route reads any media type but a form; JSON lines are text
EXAMPLES_BODY = {"required": True, "content": {"text/plain": {"schema": {
    "type": "string", "description": 'JSON lines, each an object with a "prompt" string (any media type but a form)'}}}}


def _responses(path: str, method: str, secured: bool) -> list[int]:
    codes = [400, 405]
    if secured:
        codes.append(401)
    if "{" in path or path.startswith("/v1/") and method == "post":
        codes.append(404)
    if method in ("post", "put"):
        codes.append(413)
    if path == "/admin/skillpacks" and method == "post" or path.endswith("/examples") and method == "put":
        codes += [408, 415]
    if path.startswith("/admin/skillpacks") and method in ("post", "put", "delete"):
        codes.append(409)
    if path.startswith("/v1/") and method == "post":
        codes.append(429)
    if path != "/metrics":
        codes.append(503)
    return sorted(codes)


def describe(app: FastAPI, api_key: bool, admin_auth: bool) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):  # validation errors are 400s, in the envelope
        schemas.pop(unused, None)
    schemes = components.setdefault("securitySchemes", {})
    if admin_auth:
        schemes["AdminToken"] = {"type": "http", "scheme": "bearer", "description": "the admin token"}
    if api_key:
        schemes["ApiKey"] = {"type": "http", "scheme": "bearer", "description": "the API key (SKILLPACK_API_KEY)"}
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            scheme = "AdminToken" if path.startswith("/admin") else "ApiKey" if path.startswith("/v1") else None
            secured = scheme in schemes
            if secured:
                op["security"] = [{scheme: []}]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code in _responses(path, method, secured):
                responses.setdefault(str(code), {"description": WHY[code],
                                                 "content": {"application/json": {"schema": ERROR}}})
            for param in op.get("parameters", []):
                if param.get("name") == "name" and param.get("in") == "path":
                    param["schema"] = dict(PACK_NAME)
            if path == "/admin/skillpacks" and method == "post":
                op["requestBody"] = UPLOAD_BODY
            if path.endswith("/examples") and method == "put":
                op["requestBody"] = EXAMPLES_BODY
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus text exposition format",
                                    "content": {"text/plain": {"schema": {"type": "string"}}}}
            if path.endswith("/examples") and method == "get":
                responses["200"] = {"description": "the examples as stored",
                                    "content": {"application/jsonl": {"schema": {"type": "string"}}}}
    return doc


def install_openapi(app: FastAPI, api_key: bool, admin_auth: bool) -> None:
    """Replace FastAPI's generator with `describe` (built once, on the first request for it)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = describe(app, api_key, admin_auth)
        return app.openapi_schema

    app.openapi = openapi
