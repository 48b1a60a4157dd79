"""The HTTP request bodies as the ingress receives them: strict types, storable strings and finite,
int64 filter values, each refused with a 400 naming the field (a small FastAPI app with the
ingress's error handlers; no Ray)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.http_errors import install_error_handlers
from schemas.api import EmbeddingsRequest, GraphQueryRequest, ImageSearchRequest, RagRequest, SearchRequest


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/search")
    async def search(request: SearchRequest) -> dict:
        return {"k": request.k, "explain": request.explain, "modalities": request.modalities}

    @app.post("/v1/rag")
    async def rag(request: RagRequest) -> dict:
        return {"k": request.k, "explain": request.explain, "modalities": request.modalities}

    @app.post("/v1/images/search")
    async def images(request: ImageSearchRequest) -> dict:
        return {"query": request.query, "image": request.image_b64 is not None, "target": request.target}

    @app.post("/v1/graph/query")
    async def graph(request: GraphQueryRequest) -> dict:
        path = request.path
        return {"entity": request.entity, "hops": request.hops, "path": path and [path.from_, path.to]}

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingsRequest) -> dict:
        return {"inputs": 1 if isinstance(request.input, str) else len(request.input)}

    return TestClient(app, raise_server_exceptions=False)


def post(client: TestClient, path: str, raw: str) -> tuple[int, dict]:
    """Posts ``raw`` exactly as written (JSON escapes such as ``\\ud800`` stay escapes)."""
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    return r.status_code, r.json()


LAX = [  # values a lax parser reads as another type: each is a 400 naming the field
    ("/v1/search", '{"query": "x", "k": true}', "k"),
    ("/v1/search", '{"query": "x", "k": "5"}', "k"),
    ("/v1/search", '{"query": "x", "k": 5.0}', "k"),
    ("/v1/search", '{"query": "x", "k": 1e400}', "k"),
    ("/v1/search", '{"query": "x", "explain": 1}', "explain"),
    ("/v1/search", '{"query": "x", "explain": "true"}', "explain"),
    ("/v1/rag", '{"question": "x", "k": true}', "k"),
    ("/v1/rag", '{"question": "x", "k": "3"}', "k"),
    ("/v1/rag", '{"question": "x", "explain": "yes"}', "explain"),
    ("/v1/embeddings", '{"input": "x", "dimensions": "384"}', "dimensions"),
    ("/v1/embeddings", '{"input": "x", "dimensions": true}', "dimensions"),
    ("/v1/embeddings", '{"input": "x", "user": 5}', "user"),
]


@pytest.mark.parametrize(("path", "raw", "param"), LAX, ids=[f"{p} {r}" for p, r, _ in LAX])
def test_lax_values_are_refused_naming_the_field(client, path, raw, param):
    status, body = post(client, path, raw)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request" and body["error"]["param"] == param
    assert body["error"]["message"].startswith(f"{param}: ")


def test_integers_and_booleans_of_the_right_type_pass(client):
    assert post(client, "/v1/search", '{"query": "x", "k": 5, "explain": true}') == (
        200,
        {"k": 5, "explain": True, "modalities": ["text"]},
    )
    assert post(client, "/v1/rag", '{"question": "x", "k": 2}')[0] == 200
    assert post(client, "/v1/embeddings", '{"input": "x", "dimensions": 384, "user": "u"}')[0] == 200


def test_the_embeddings_request_keeps_tolerating_unknown_fields(client):
    assert post(client, "/v1/embeddings", '{"input": ["a", "b"], "x_vendor": {"any": [1]}}') == (
        200,
        {"inputs": 2},
    )


SURROGATES = [  # a lone surrogate in any string field: a 400 naming it, never a 500 further in
    ("/v1/search", '{"query": "a \\ud800"}', "query", "query"),
    ("/v1/rag", '{"question": "\\udc00"}', "question", "question"),
    ("/v1/search", '{"query": "x", "filter": {"lang": "e\\ud800n"}}', "filter", "'lang'"),
    ("/v1/search", '{"query": "x", "filter": {"lang": {"in": ["en", "\\udfff"]}}}', "filter", "'lang'"),
    ("/v1/embeddings", '{"input": "\\ud800"}', "input", "input"),
    ("/v1/embeddings", '{"input": ["ok", "x\\udc00"]}', "input", "input[1]"),
    ("/v1/embeddings", '{"input": "x", "model": "\\ud800"}', "model", "model"),
    ("/v1/embeddings", '{"input": "x", "user": "\\ud800"}', "user", "user"),
    ("/v1/images/search", '{"query": "a \\udc00"}', "query", "query"),
    ("/v1/images/search", '{"image_b64": "iVBO\\ud800"}', "image_b64", "image_b64"),
]


@pytest.mark.parametrize(("path", "raw", "param", "named"), SURROGATES, ids=[s[1] for s in SURROGATES])
def test_a_lone_surrogate_in_any_string_is_a_400_naming_the_field(client, path, raw, param, named):
    status, body = post(client, path, raw)
    assert status == 400, body
    error = body["error"]
    assert error["param"] == param and named in error["message"] and "lone surrogate" in error["message"]


def test_embeddings_input_errors_name_the_item_not_pydantics_union_branches(client):
    status, body = post(client, "/v1/embeddings", '{"input": ["ok", 7]}')
    assert status == 400 and body["error"]["param"] == "input"
    assert body["error"]["message"] == "input: input[1] must be a string, got a number"
    status, body = post(client, "/v1/embeddings", '{"input": {"text": "x"}}')
    assert status == 400 and body["error"]["message"] == "input: input must be a string, got an object"


NOT_STORABLE = [  # filter values no record could hold: JSON NaN/Infinity parse, then are refused
    ('{"lang": NaN}', "not a finite number"),
    ('{"score": {"gte": Infinity}}', "not a finite number"),
    ('{"score": {"lt": 1e400}}', "not a finite number"),
    ('{"n": 9223372036854775808}', "64-bit range"),
    ('{"n": {"in": [1, -9223372036854775809]}}', "64-bit range"),
]


@pytest.mark.parametrize(("raw", "needle"), NOT_STORABLE, ids=[n[0] for n in NOT_STORABLE])
def test_filter_values_no_record_could_hold_are_refused(client, raw, needle):
    status, body = post(client, "/v1/search", '{"query": "x", "filter": ' + raw + "}")
    assert status == 400 and body["error"]["param"] == "filter" and needle in body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/search", "/v1/rag", "/v1/embeddings"])
def test_json_nested_too_deeply_is_a_400_not_a_crash(client, path):
    status, body = post(client, path, "[" * 100_000 + "]" * 100_000)
    assert status == 400 and body["error"]["code"] == "invalid_json", body


MODALITIES = [  # each a 400 naming the field
    ("/v1/search", '{"query": "x", "modalities": []}', "modalities", "at least one"),
    ("/v1/search", '{"query": "x", "modalities": ["text", "image", "text"]}', "modalities", "repeats 'text'"),
    ("/v1/search", '{"query": "x", "modalities": ["video"]}', "modalities.0", "'text' or 'image'"),
    ("/v1/search", '{"query": "x", "modalities": "image"}', "modalities", "list"),
    ("/v1/rag", '{"question": "x", "modalities": []}', "modalities", "at least one"),
    ("/v1/rag", '{"question": "x", "modalities": [null]}', "modalities.0", "'text' or 'image'"),
]


@pytest.mark.parametrize(("path", "raw", "param", "needle"), MODALITIES, ids=[m[1] for m in MODALITIES])
def test_modalities_must_name_text_or_image_each_once(client, path, raw, param, needle):
    status, body = post(client, path, raw)
    assert status == 400 and body["error"]["param"] == param, body
    assert needle in body["error"]["message"]


def test_modalities_default_to_text_and_take_both_in_any_order(client):
    assert post(client, "/v1/rag", '{"question": "x"}')[1]["modalities"] == ["text"]
    assert post(client, "/v1/search", '{"query": "x", "modalities": ["image", "text"]}')[1]["modalities"] == [
        "image",
        "text",
    ]


ONE_OF_TWO = [  # requests that take exactly one of two fields: each a 400 naming the field
    ("/v1/images/search", "{}", "image_b64", "give query (a text) or image_b64"),
    ("/v1/images/search", '{"query": "a red circle", "image_b64": "iVBORw0K"}', "image_b64", "not both"),
    ("/v1/images/search", '{"query": "  "}', "query", "blank"),
    ("/v1/images/search", '{"query": "a red circle", "target": "text"}', "target", "POST /v1/search"),
    ("/v1/images/search", '{"image_b64": "iVBORw0K", "target": "video"}', "target", "'text' or 'image'"),
    ("/v1/images/search", '{"image_b64": ""}', "image_b64", "at least 1"),
    ("/v1/images/search", '{"image_b64": "iVBORw0K", "k": "3"}', "k", "integer"),
    ("/v1/images/search", '{"query": "x", "mode": "vector"}', "mode", "not permitted"),
    ("/v1/images/search", '{"query": "x", "filter": {"n": NaN}}', "filter", "finite"),
    ("/v1/graph/query", "{}", "path", "give entity (a neighbourhood) or path"),
    ("/v1/graph/query", '{"entity": "Tesla", "path": {"from": "a", "to": "b"}}', "path", "not both"),
    ("/v1/graph/query", '{"entity": "Tesla", "hops": 4}', "hops", "less than or equal to 3"),
    ("/v1/graph/query", '{"entity": "Tesla", "hops": 0}', "hops", "greater than or equal to 1"),
    ("/v1/graph/query", '{"entity": "Tesla", "hops": "2"}', "hops", "integer"),
    ("/v1/graph/query", '{"entity": ""}', "entity", "at least 1"),
    ("/v1/graph/query", '{"path": {"from": "a"}}', "path.to", "required"),
    ("/v1/graph/query", '{"path": {"from": "a", "to": "b", "via": "c"}}', "path.via", "not permitted"),
    (
        "/v1/graph/query",
        '{"path": {"from": "a", "to": "b"}, "max_hops": 7}',
        "max_hops",
        "less than or equal to 6",
    ),
    ("/v1/graph/query", '{"entity": "Tesla", "limit": 0}', "limit", "greater than or equal to 1"),
    ("/v1/graph/query", '{"entity": "\\ud800"}', "entity", "surrogate"),
]


@pytest.mark.parametrize(
    ("path", "raw", "param", "needle"), ONE_OF_TWO, ids=[f"{p} {r}" for p, r, *_ in ONE_OF_TWO]
)
def test_image_and_graph_queries_say_which_field_is_wrong(client, path, raw, param, needle):
    status, body = post(client, path, raw)
    assert status == 400 and body["error"]["code"] == "invalid_request", body
    assert body["error"]["param"] == param and needle in body["error"]["message"], body


def test_an_image_search_by_text_or_by_image(client):
    assert post(client, "/v1/images/search", '{"query": "a red circle", "k": 3}') == (
        200,
        {"query": "a red circle", "image": False, "target": "image"},
    )
    assert post(client, "/v1/images/search", '{"image_b64": "iVBORw0K", "target": "text"}') == (
        200,
        {"query": None, "image": True, "target": "text"},
    )


def test_a_graph_query_by_entity_or_by_path(client):
    assert post(client, "/v1/graph/query", '{"entity": "Nikola Tesla", "hops": 2}') == (
        200,
        {"entity": "Nikola Tesla", "hops": 2, "path": None},
    )
    assert post(client, "/v1/graph/query", '{"path": {"from": "Tesla", "to": "Edison"}}') == (
        200,
        {"entity": None, "hops": 1, "path": ["Tesla", "Edison"]},
    )
