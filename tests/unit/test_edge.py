"""The edge's guards on a small FastAPI app wired like the ingress (no Ray): keys and scopes,
the Host header, JSON-only bodies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from deployments import edge
from deployments.edge import EdgeGuard, configure, require, require_metrics
from deployments.http_errors import install_error_handlers
from schemas.settings import ServeConfig, load_settings

READER = "r" * 24
WRITER = "w" * 24
BOTH = "b-" + "x" * 22


def serve_config(**serve: object) -> ServeConfig:
    return load_settings(overrides={"serve": serve}).serve


KEYS = [
    {"key": READER, "scopes": ["read"], "name": "reader"},
    {"key": WRITER, "scopes": ["write"]},
    {"key": BOTH, "scopes": ["write", "read"]},
]


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(EdgeGuard)

    @app.post("/read", dependencies=[Depends(require("read"))])
    async def read(body: dict) -> dict:
        return body

    @app.post("/write", dependencies=[Depends(require("write"))])
    async def write(body: dict) -> dict:
        return body

    @app.delete("/write/{name}", dependencies=[Depends(require("write"))])
    async def delete(name: str) -> dict:
        return {"deleted": name}

    @app.get("/metrics", dependencies=[Depends(require_metrics)])
    async def metrics() -> dict:
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


@pytest.fixture
def configured() -> Iterator[Callable[..., TestClient]]:
    def apply(**serve: object) -> TestClient:
        configure(serve_config(**serve))
        return TestClient(make_app(), base_url="http://127.0.0.1:8000", raise_server_exceptions=False)

    yield apply
    configure(serve_config())  # the process default again: open, loopback


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_without_keys_every_route_is_open(configured):
    client = configured()
    assert client.post("/read", json={"a": 1}).json() == {"a": 1}
    assert client.post("/write", json={"b": 2}).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_a_missing_or_unknown_key_is_401_with_a_challenge(configured):
    client = configured(auth={"keys": KEYS})
    for headers in ({}, bearer("nope" * 5), {"X-API-Key": "z" * 30}, {"Authorization": f"Basic {READER}"}):
        response = client.post("/read", json={}, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert READER not in client.post("/read", json={}, headers=bearer(READER + "x")).text


def test_scopes_decide_403_or_pass(configured):
    client = configured(auth={"keys": KEYS})
    assert client.post("/read", json={"q": 1}, headers=bearer(READER)).json() == {"q": 1}
    assert client.post("/read", json={}, headers={"X-API-Key": READER}).status_code == 200
    forbidden = client.post("/write", json={}, headers=bearer(READER))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert "write" in forbidden.json()["error"]["message"]
    assert client.delete("/write/x", headers=bearer(READER)).status_code == 403
    assert client.post("/read", json={}, headers=bearer(WRITER)).status_code == 403
    assert client.delete("/write/x", headers=bearer(WRITER)).json() == {"deleted": "x"}
    assert client.post("/read", json={}, headers=bearer(BOTH)).status_code == 200
    assert client.post("/write", json={}, headers=bearer(BOTH)).status_code == 200


def test_healthz_is_open_and_metrics_follow_the_setting(configured):
    client = configured(auth={"keys": KEYS})
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(WRITER)).status_code == 403
    assert client.get("/metrics", headers=bearer(READER)).status_code == 200
    client = configured(auth={"keys": KEYS, "metrics": "open"})
    assert client.get("/metrics").status_code == 200


def test_the_openapi_schema_declares_both_ways_to_send_a_key(configured):
    schema = configured().app.openapi()
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert schema["paths"]["/read"]["post"]["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_a_body_that_is_not_json_is_415_so_no_page_can_post_cross_site(configured, content_type):
    client = configured()
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/write", content=b'{"id": "x"}', headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/merge+json"]
)
def test_json_media_types_pass(configured, content_type):
    response = configured().post("/write", content=b'{"id": "x"}', headers={"content-type": content_type})
    assert response.status_code == 200 and response.json() == {"id": "x"}


def test_requests_without_a_body_need_no_content_type(configured):
    client = configured()
    assert client.delete("/write/abc").status_code == 200
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("serve", "host", "allowed"),
    [
        ({}, "127.0.0.1:8000", True),
        ({}, "localhost:8000", True),
        ({}, "[::1]:8000", True),
        ({}, "rebound.attacker.example:8000", False),
        ({}, "", False),
        ({"host": "10.1.2.3", "auth": {"keys": KEYS}}, "10.1.2.3:8000", True),
        ({"host": "10.1.2.3", "auth": {"keys": KEYS}}, "other.example", False),
        ({"host": "0.0.0.0", "auth": {"keys": KEYS}}, "anything.example", True),
        ({"allowed_hosts": ["search.example.com", "*.internal"]}, "search.example.com", True),
        ({"allowed_hosts": ["search.example.com", "*.internal"]}, "a.b.internal:443", True),
        ({"allowed_hosts": ["search.example.com", "*.internal"]}, "127.0.0.1:8000", False),
    ],
)
def test_the_host_header_must_be_one_the_app_serves(configured, serve, host, allowed):
    client = configured(**serve)
    headers = {"host": host, **bearer(BOTH)}
    response = client.get("/healthz", headers=headers)
    if allowed:
        assert response.status_code == 200
    else:
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host"


def test_keys_are_kept_as_digests_only(configured):
    configured(auth={"keys": KEYS})
    ring = edge.keyring()
    assert ring.enabled and len(ring.scopes) == 3
    stored = repr(ring)
    assert all(k not in stored for k in (READER, WRITER, BOTH))
    assert sorted(ring.labels.values()) == ["keys[1]", "keys[2]", "reader"]


def test_a_route_dependency_shipped_by_value_checks_the_keys_configured_where_it_runs(configured):
    # Serve pickles the app, closures included, by value (a copy of the globals they name) and
    # configures the keys in the replica afterwards: the unpickled check must still see them.
    from ray import cloudpickle

    configured()  # no keys where the app is built
    shipped = cloudpickle.loads(cloudpickle.dumps(require("read")))
    configure(serve_config(auth={"keys": KEYS}))  # as the replica does at start
    app = FastAPI()
    install_error_handlers(app)
    app.add_api_route("/read", lambda: {"ok": True}, dependencies=[Depends(shipped)])
    client = TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    assert client.get("/read").status_code == 401
    assert client.get("/read", headers=bearer(WRITER)).status_code == 403
    assert client.get("/read", headers=bearer(READER)).json() == {"ok": True}


def test_without_a_known_key_a_body_is_refused_401_before_it_is_parsed(configured):
    client = configured(auth={"keys": KEYS})
    broken = {"content-type": "application/json"}
    for headers in ({}, bearer("n" * 24), {"X-API-Key": "n" * 24}):
        r = client.post("/read", content=b'{"unfinished": ', headers={**broken, **headers})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/read", content=b'{"unfinished": ', headers={**broken, **bearer(READER)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/read", content=b'{"unfinished": ', headers={**broken, "X-API-Key": WRITER})
    assert r.status_code == 400, "a known key passes the edge; its scope is the route's to check"
