"""The auth surface, beyond tests/server/test_auth.py's walk of /admin and /v1 routes: every
route of the app is classified (so a route added under a new prefix cannot slip through open),
near-miss tokens are refused on every admin route, and tokens are compared in constant time."""
from __future__ import annotations

import ast
import hmac
import inspect

import pytest

import skillpack_server.auth as auth
from tests.server.test_api_common import ADMIN_TOKEN, serve, settings_for
from tests.server.test_auth import app_routes, concrete

PUBLIC = {("/health", "GET"), ("/metrics", "GET"), ("/openapi.json", "GET"), ("/docs", "GET"),
          ("/docs/oauth2-redirect", "GET"), ("/redoc", "GET")}  # read-only, no pack or model data written
API_KEY = "inference-key-for-surface"


@pytest.fixture(scope="module")
def client(pair, tmp_path_factory):
    with serve(settings_for(pair, tmp_path_factory.mktemp("store"), api_key=API_KEY)) as c:
        yield c


def test_every_route_is_admin_inference_or_a_known_public_read(client):
    routes = list(app_routes(client.app))
    unclassified = [(p, m) for p, m in routes
                    if not p.startswith(("/admin/", "/v1/")) and p != "/admin" and (p, m) not in PUBLIC]
    assert unclassified == [], (f"routes {unclassified} are neither under /admin (admin token) nor /v1 "
                                "(API key) nor in the public read-only list; put them behind a token")
    assert {m for p, m in routes if (p, m) in PUBLIC} == {"GET"}


def test_every_admin_route_refuses_near_miss_tokens(client):
    near_misses = [
        ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", ADMIN_TOKEN.upper(), ADMIN_TOKEN[::-1], "", " ",
        f"{ADMIN_TOKEN}\x00", "x" * 10_000,
    ]
    admin = [(p, m) for p, m in app_routes(client.app) if p.startswith("/admin")]
    assert len(admin) >= 8
    for path, method in admin:
        for token in near_misses:
            r = client.request(method, concrete(path), headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, (method, path, token[:20], r.text)
        # the token anywhere but the Authorization header does not count
        r = client.request(method, concrete(path), params={"token": ADMIN_TOKEN, "access_token": ADMIN_TOKEN},
                           headers={"X-Admin-Token": ADMIN_TOKEN, "Cookie": f"token={ADMIN_TOKEN}"})
        assert r.status_code == 401, (method, path, r.text)


def test_tokens_are_compared_in_constant_time(client, monkeypatch):
    """Both checks go through hmac.compare_digest, and auth.py has no `==` on a secret."""
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert client.get("/admin/skillpacks", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (ADMIN_TOKEN.encode(), ADMIN_TOKEN.encode()) in calls
    assert (API_KEY.encode(), API_KEY.encode()) in calls and (b"wrong", API_KEY.encode()) in calls

    secret_names = ("token", "key", "expected", "given", "secret")
    tree = ast.parse(inspect.getsource(auth))
    plain = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
             and any(s in ast.unparse(node).lower() for s in secret_names)]
    assert plain == [], f"secrets compared with ==/!= (timing leak): {plain}"
