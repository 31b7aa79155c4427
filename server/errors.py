"""Every error the server returns, in OpenAI's envelope: {"error": {message, type, param, code}}.

The API edge: the domain errors of the engine, the pack cache and the pack store
(`skillpack_server.exceptions`) get their HTTP status here, and only here.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from skillpack_server.exceptions import (
    DomainError, EngineFailure, EngineOverloaded, EngineUnavailable, ExamplesInvalid, ExamplesNotFound,
    ExamplesNotSupported, InvalidRequest, PackExists, PackInUse, PackInvalid, PackMismatch, PackNotFound,
    PackReadOnly, SharedStoreUnavailable, StorageFailed, StorageFull, TooLarge,
)

log = logging.getLogger("skillpack.server")
CLIENT_CLOSED_REQUEST = 499
# members of the chat messages' tagged union (by role): not fields of their own
UNION_TAGS = ("system", "developer", "user", "assistant", "tool", "function")

# OpenAI's `type` for each status class the server returns
_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable_error",
}


# each domain error's HTTP status (a subclass takes its base's)
STATUS_OF: dict[type[DomainError], int] = {
    InvalidRequest: 400, PackInvalid: 400, ExamplesInvalid: 400,
    PackNotFound: 404, ExamplesNotFound: 404,
    PackExists: 409, PackReadOnly: 409, PackInUse: 409, PackMismatch: 409,
    TooLarge: 413, EngineOverloaded: 429,
    EngineFailure: 500, StorageFailed: 500, ExamplesNotSupported: 501,
    EngineUnavailable: 503, SharedStoreUnavailable: 503, StorageFull: 507,
}
RETRYABLE = (EngineOverloaded, EngineUnavailable)  # answered with Retry-After


def status_of(exc: DomainError) -> int:
    return next(status for kind, status in STATUS_OF.items() if isinstance(exc, kind))


def domain_error_body(exc: DomainError) -> dict:
    """The envelope of a domain error (also sent in-band when a stream has already started)."""
    return error_body(status_of(exc), exc.message, exc.param, exc.code)


class APIError(Exception):
    """An error raised where the bad value enters; turned into the envelope by the handler."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _param_of(err: dict) -> str | None:
    """`('body', 'messages', 0, 'user', 'content')` -> `messages.0.content` (the field OpenAI calls
    param): a tagged union's member name (a chat role) is dropped, a bad tag names its field."""
    loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    parts = [str(p) for i, p in enumerate(loc) if not (i > 1 and loc[i - 2] == "messages" and p in UNION_TAGS)]
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        parts.append(str(err.get("ctx", {}).get("discriminator", "")).strip("'"))
    return ".".join(parts) or None


def _validation_message(err: dict, param: str | None) -> str:
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err.get("type") == "missing":
        return f"`{param}` is required." if param else "A required field is missing."
    if err.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    if err.get("type") == "extra_forbidden":  # OpenAI's wording for a field it does not know
        return f"Unrecognized request argument supplied: {param}"
    if not param or f"`{param}`" in msg:  # the sentence already names the field
        return msg
    return f"Invalid value for `{param}`: {msg}"


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _on_domain_error(request: Request, exc: DomainError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(exc, RETRYABLE) else None
    return error_response(status_of(exc), exc.message, exc.param, exc.code, headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_of(first)
    return error_response(400, _validation_message(first, param), param, "invalid_value")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (Starlette's own 405 names only the first).
    `app.state.route_methods` is [(path regex, methods)] of every route, listed at start-up."""
    path = request.scope.get("path", "")
    return sorted({m for regex, methods in request.app.state.route_methods if regex.match(path) for m in methods})


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404:
        message = f"No route matches {request.method} {request.url.path}."
    elif exc.status_code == 405:
        allowed = allowed_methods(request)
        message = f"Method {request.method} is not allowed on {request.url.path}; it takes {', '.join(allowed)}."
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, None, None, headers)


async def _on_client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # the client closed the connection mid-body: nobody reads this answer; 499 (nginx's
    # "client closed request") keeps it out of the 5xx counts that page someone
    log.info("client went away during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # the traceback goes to the log, never to the client
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "The server hit an internal error; it has been logged.", None, "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(DomainError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(Exception, _on_unexpected)
