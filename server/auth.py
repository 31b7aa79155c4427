"""Bearer-token checks: the optional inference API key and the admin token (router dependencies)."""
from __future__ import annotations

import hmac

from fastapi import Request

from skillpack_server.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(request: Request, expected: str, what: str) -> None:
    given = _bearer(request)
    # compare_digest: the time taken does not reveal how much of the token matched
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        reason = "missing" if given is None else "not valid"
        raise APIError(401, f"The {what} in the `Authorization: Bearer ...` header is {reason}.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request) -> None:
    """For /v1 routes: checks the API key when one is configured."""
    expected = request.app.state.settings.api_key
    if expected:
        _check(request, expected, "API key")


def require_admin(request: Request) -> None:
    """For /admin routes: checks the admin token unless the server runs with --no-admin-auth."""
    settings = request.app.state.settings
    if settings.admin_token:
        _check(request, settings.admin_token, "admin token")
    elif not settings.no_admin_auth:
        raise APIError(503, "The admin API is disabled: the server has no admin token.", code="admin_disabled")
