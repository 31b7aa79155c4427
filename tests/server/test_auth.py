"""Admin token and API key: every admin route refuses a missing or wrong token (found by walking
app.routes, so a new route cannot slip through); the server will not start with an open admin API."""
import re

import pytest

from skillpack_server.app import create_app
from skillpack_server.settings import Settings
from tests.server.test_api_common import ADMIN, ADMIN_TOKEN, serve, settings_for


def app_routes(app):
    """(path, method) of every route, reaching into included routers on FastAPI versions that nest them."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        contexts = app.routes
    else:
        contexts = iter_route_contexts(app.routes)
    for route in contexts:
        for method in sorted(getattr(route, "methods", None) or []):
            if method != "HEAD":
                yield route.path, method


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-pack", path)


@pytest.fixture(scope="module")
def client(llama, tmp_path_factory):
    settings = settings_for(llama, tmp_path_factory.mktemp("store"), api_key="inference-key-123")
    with serve(settings) as c:
        yield c


def test_every_admin_route_refuses_missing_and_wrong_tokens(client):
    admin = [(p, m) for p, m in app_routes(client.app) if p.startswith("/admin")]
    assert len(admin) >= 11  # upload, list, get, delete, load, unload, pin, unpin; examples put, get, delete
    for path, method in admin:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
                        {"Authorization": "Bearer inference-key-123"}):
            r = client.request(method, concrete(path), headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"


def test_the_admin_token_opens_admin_routes(client):
    assert client.get("/admin/skillpacks", headers=ADMIN).status_code == 200


def test_every_v1_route_needs_the_api_key_when_set(client):
    v1 = [(p, m) for p, m in app_routes(client.app) if p.startswith("/v1")]
    assert {p for p, _ in v1} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for path, method in v1:
        for headers in ({}, {"Authorization": "Bearer nope"}, ADMIN):
            r = client.request(method, concrete(path), headers=headers)
            assert r.status_code == 401, (method, path, r.text)
    assert client.get("/v1/models", headers={"Authorization": "Bearer inference-key-123"}).status_code == 200


def test_health_and_metrics_are_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_no_admin_token_refuses_to_start_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="--no-admin-auth"):
        create_app(Settings(packs=tmp_path))
    app = create_app(Settings(packs=tmp_path, no_admin_auth=True))
    assert app.state.settings.admin_token is None


def test_open_admin_when_asked(llama, tmp_path):
    with serve(settings_for(llama, tmp_path, admin_token=None, no_admin_auth=True)) as c:
        assert c.get("/admin/skillpacks").status_code == 200


def test_short_admin_token_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 8"):
        Settings(packs=tmp_path, admin_token="short")


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SKILLPACK_ADMIN_TOKEN", "from-the-env-123")
    monkeypatch.setenv("SKILLPACK_MAX_MODEL_LEN", "64")
    s = Settings(packs=tmp_path)
    assert s.admin_token == "from-the-env-123" and s.engine.max_model_len == 64
