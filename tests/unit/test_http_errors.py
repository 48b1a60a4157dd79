"""The error shapes and the body limit, on a small FastAPI app (no Ray: the same handlers the
ingress installs)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.http_errors import ApiError, BodyLimit, as_api_error, install_error_handlers
from schemas.api import EmbeddingsRequest, SearchRequest
from schemas.errors import IndexUnavailableError, InvalidRequestError, RetryableError


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=lambda: 100)

    @app.post("/search")
    async def search(request: SearchRequest) -> dict:
        return {"query": request.query}

    @app.get("/unavailable")
    async def unavailable() -> dict:
        raise IndexUnavailableError("shard 1 is restoring")

    @app.get("/bug")
    async def bug() -> dict:
        raise KeyError("oops")

    @app.get("/api")
    async def api() -> dict:
        raise ApiError(409, "conflict", "already there", "id")

    return TestClient(app, raise_server_exceptions=False)


def error(response) -> dict:
    return response.json()["error"]


def test_valid_request_passes(client):
    assert client.post("/search", json={"query": "hi"}).json() == {"query": "hi"}


def test_malformed_json_is_400_invalid_json(client):
    r = client.post("/search", content=b'{"query": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"


def test_validation_errors_name_the_field(client):
    r = client.post("/search", json={"query": "x", "k": "three"})
    assert r.status_code == 400 and error(r)["param"] == "k" and "k:" in error(r)["message"]
    r = client.post("/search", json={"query": "x", "filter": {"year": {"bigger": 3}}})
    assert r.status_code == 400 and error(r)["param"].startswith("filter")


def test_declared_and_streamed_bodies_over_the_limit_are_413(client):
    r = client.post("/search", json={"query": "x" * 200})
    assert r.status_code == 413 and error(r)["code"] == "body_too_large"

    def chunks():
        yield b'{"query": "'
        yield b"y" * 150
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error(r)["code"] == "body_too_large"


def test_known_errors_map_to_their_status(client):
    r = client.get("/unavailable")
    assert r.status_code == 503 and error(r) == {
        "code": "index_unavailable",
        "message": "shard 1 is restoring",
        "param": None,
    }
    r = client.get("/api")
    assert r.status_code == 409 and error(r)["param"] == "id"


def test_a_bug_is_a_500_that_says_little(client):
    r = client.get("/bug")
    assert r.status_code == 500 and error(r)["code"] == "internal_error" and "oops" not in r.text


def test_404_and_405_keep_the_shape(client):
    assert error(client.get("/missing"))["code"] == "not_found"
    assert error(client.get("/search"))["code"] == "method_not_allowed"


def test_as_api_error_unwraps_ray_task_errors():
    class Wrapped(Exception):
        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

    known = as_api_error(Wrapped(InvalidRequestError("unknown filter field 'x'", param="filter")))
    assert known is not None and (known.status, known.param) == (400, "filter")
    assert as_api_error(RetryableError("broker down")).status == 503
    assert as_api_error(ValueError("a bug")) is None


def test_embeddings_request_refuses_token_ids_with_a_reason():
    with pytest.raises(ValueError, match="token-id input is not supported"):
        EmbeddingsRequest.model_validate({"input": [[1, 2, 3]]})
    assert EmbeddingsRequest.model_validate({"input": "x", "extra_field": 1}).input == "x"
