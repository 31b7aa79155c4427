"""Bearer-token checks: the optional inference API key and the admin token (router dependencies)."""
from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

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


class AdminTokenError(Exception):
    """The admin token file cannot be used; the message says which file and why."""


def load_or_create_admin_token(path: Path) -> tuple[str, bool]:
    """The token kept in `path`, or a new one written there (mode 0600, folder 0700); and
    whether it was created. A file others can read or write is refused, as ssh refuses keys."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        # O_EXCL: two servers starting at once do not overwrite each other's token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_admin_token(path), False
    except OSError as exc:
        raise AdminTokenError(f"cannot create the admin token file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True


def _read_admin_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AdminTokenError(f"the admin token file {path} has mode {stat.S_IMODE(mode):04o}; expected 0600 "
                                  f"(only you may read it): chmod 600 {path}")
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminTokenError(f"cannot read the admin token file {path}: {exc}") from None
    if len(token) < 8:
        raise AdminTokenError(f"the admin token file {path} holds {len(token)} characters; expected a token of "
                              "at least 8 (delete the file to have a new one generated)")
    return token
