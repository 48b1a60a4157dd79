"""The error shapes and the body limit, on a small FastAPI app (no Ray: the same handlers the
ingress installs)."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI
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

    @app.delete("/items/{item}")
    async def delete_item(item: str) -> dict:
        return {"deleted": item}

    @app.get("/items/{item}")
    async def get_item(item: str) -> dict:
        return {"item": item}

    router = APIRouter()  # included, as Serve includes a class's routes into the app

    @router.delete("/nested/{item}")
    async def delete_nested(item: str) -> dict:
        return {"deleted": item}

    @router.get("/nested/{item}")
    async def get_nested(item: str) -> dict:
        return {"item": item}

    app.include_router(router, prefix="/v1")

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


def test_a_405_names_every_method_the_path_allows(client):
    r = client.request("TRACE", "/search")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    for path in ("/items/7", "/v1/nested/7"):  # a GET route and a DELETE route share the path
        r = client.request("OPTIONS", path)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET", (path, r.headers)
        assert error(r)["code"] == "method_not_allowed"


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


def _task_error(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    return RayTaskError("f", "Traceback (most recent call last): ...", cause).as_instanceof_cause()


def test_ray_actor_and_system_failures_are_503_not_bugs():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, WorkerCrashedError

    for exc in (ActorDiedError(), ActorUnavailableError("restarting", None), WorkerCrashedError()):
        known = as_api_error(exc)
        assert known is not None and (known.status, known.code) == (503, "unavailable"), exc
        assert "retry shortly" in known.message and "\n" not in known.message


def test_nested_task_errors_are_unwrapped_to_the_first_cause():
    # A shard's error re-raised by the retriever replica arrives wrapped twice at the ingress.
    nested = _task_error(_task_error(IndexUnavailableError("index 'wiki': shard 1 is unavailable")))
    known = as_api_error(nested)
    assert known is not None and known.status == 503 and "shard 1" in known.message
    assert as_api_error(_task_error(_task_error(KeyError("bug")))) is None


def test_an_endpoint_raising_a_shard_error_wrapped_by_ray_answers_503():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/search")
    async def search() -> dict:
        raise _task_error(IndexUnavailableError("index 'wiki': shard 0 is unavailable: its actor died"))

    r = TestClient(app, raise_server_exceptions=False).get("/search")
    assert (
        r.status_code == 503 and error(r)["code"] == "index_unavailable" and "shard 0" in error(r)["message"]
    )


def test_an_error_quoting_a_lone_surrogate_can_still_be_sent():
    from deployments.http_errors import error_response

    response = error_response(400, "invalid_envelope", "title: 'bad \ud800'", "documents[0]")
    assert b"bad \\\\ud800" in response.body


def test_a_body_fastapi_cannot_parse_is_400_invalid_json_saying_why(client):
    # FastAPI answers it with a bare 400 ("There was an error parsing the body"), chaining the cause;
    # JSON nested too deeply is the other such case (tests/unit/test_api_requests.py).
    r = client.post("/search", content=b'{"query": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and error(r)["code"] == "invalid_json"
    assert "UnicodeDecodeError" in error(r)["message"]


def test_a_full_deployment_queue_is_a_503_overloaded_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    for exc, wait in ((BackPressureError(17, 16), "1"), (BackPressureError(17, 16, retry_after_s=2.2), "3")):
        known = as_api_error(exc)
        assert known is not None and (known.status, known.code) == (503, "overloaded"), exc
        assert known.headers == {"Retry-After": wait} and "max_queued_requests=16" in known.message
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/rag")
    async def rag() -> None:
        raise as_api_error(BackPressureError(40, 16)) or AssertionError

    r = TestClient(app).post("/v1/rag", json={})
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.headers
    assert error(r)["code"] == "overloaded"
