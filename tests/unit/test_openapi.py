"""The app's OpenAPI schema as the ingress declares it (deployments/openapi.py), read from the
FastAPI app without serving it, with API keys configured and without: the statuses each route
declares, the body of POST /v1/documents against real envelopes, the /healthz bodies against
``health_report``'s; and the document routes' paths."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Match

from deployments.edge import configure
from deployments.ingress import MAX_DOCUMENTS_PER_REQUEST, app
from deployments.metrics import health_report
from deployments.openapi import documents_body
from schemas.settings import load_settings

ENVELOPE = {"kind": "document", "id": "a", "text": "some text", "metadata": {"year": 2020}}


def built(**serve: object) -> dict[str, Any]:
    """The schema of an app whose replica was configured with ``serve`` settings."""
    configure(load_settings(overrides={"serve": serve}).serve)
    app.openapi_schema = None
    try:
        return copy.deepcopy(app.openapi())
    finally:
        configure(load_settings().serve)  # the process default again: open, loopback
        app.openapi_schema = None


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return built(auth={"keys": [{"key": "k" * 24, "scopes": ["read", "write"]}]})


def operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{m.upper()} {p}": op for p, ops in schema["paths"].items() for m, op in ops.items()}


def body_validator() -> Draft202012Validator:
    body = documents_body(MAX_DOCUMENTS_PER_REQUEST)["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator(body)


IMAGE = {"kind": "image", "id": "i", "uri": "s3://bucket/cat.png"}
DELETE = {"kind": "document", "id": "a", "op": "delete"}


@pytest.mark.parametrize(
    "payload", [ENVELOPE, [ENVELOPE, {**ENVELOPE, "id": "b"}], {"documents": [ENVELOPE]}, IMAGE, DELETE]
)
def test_the_documents_body_takes_each_form_the_handler_takes(payload):
    errors = list(body_validator().iter_errors(payload))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize(
    "payload",
    [{"id": "a", "text": "no kind"}, [], [ENVELOPE] * (MAX_DOCUMENTS_PER_REQUEST + 1), {"documents": []},
     {**ENVELOPE, "kind": "video"}, "a string"],
)  # fmt: skip
def test_the_documents_body_refuses_what_the_handler_refuses(payload):
    assert not body_validator().is_valid(payload)


def test_no_route_declares_a_422_it_never_answers(schema):
    for label, op in operations(schema).items():
        assert "422" not in op["responses"], label
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_routes_that_need_a_key_declare_401_and_403_and_only_body_routes_declare_415(schema):
    for label, op in operations(schema).items():
        responses = set(op["responses"])
        assert {"400", "413"} <= responses, label  # the edge's: a bad Host header, a body too large
        if op.get("security"):
            assert {"401", "403"} <= responses, label
        assert ("415" in responses) == ("requestBody" in op), label
    assert not operations(schema)["GET /healthz"].get("security")


def test_an_app_without_keys_declares_no_key_requirement_401_or_403(schema):
    open_app = built()
    assert "securitySchemes" not in open_app.get("components", {})
    for label, op in operations(open_app).items():
        assert "security" not in op and not {"401", "403"} & set(op["responses"]), label
    assert operations(open_app).keys() == operations(schema).keys()


def test_metrics_is_text_and_its_errors_are_json(schema):
    responses = operations(schema)["GET /metrics"]["responses"]
    assert set(responses["200"]["content"]) == {"text/plain"}
    for status in ("400", "401", "403", "413"):
        error = responses[status]["content"]["application/json"]["schema"]
        assert Draft202012Validator(error).is_valid({"error": {"code": "x", "message": "y", "param": None}})


@pytest.mark.parametrize(
    "shards",
    [[{"shard": 0, "status": "ok", "chunks": 5, "vectors": 5}],
     [{"shard": 0, "status": "unavailable", "problem": "restoring"}], []],
)  # fmt: skip
def test_the_healthz_declaration_matches_what_health_report_answers(schema, shards):
    status, body = health_report("idx", shards)
    declared = operations(schema)["GET /healthz"]["responses"][str(status)]
    errors = list(Draft202012Validator(declared["content"]["application/json"]["schema"]).iter_errors(body))
    assert not errors, [e.message for e in errors]


def app_routes(routes: list[Any]) -> Iterator[Any]:
    for route in routes:  # Serve includes the class's routes into the app as a router of their own
        included = getattr(route, "original_router", None)
        yield from app_routes(included.routes) if included is not None else [route]


@pytest.mark.parametrize("document_id", ["abc\n", "a\nb", "a/b c", "\n"])
def test_the_document_routes_take_any_id_whole_for_the_handler_to_judge(document_id):
    # Starlette's ``:path`` stops at a line break: "abc\n" was read as "abc" (a DELETE of
    # another document), "a\nb" matched no route (a 404).
    routes = [r for r in app_routes(app.router.routes) if "{document_id" in getattr(r, "path", "")]
    assert {m for r in routes for m in r.methods} == {"GET", "DELETE"}
    for route in routes:
        [method] = route.methods
        scope = {"type": "http", "path": f"/v1/documents/{document_id}", "method": method, "root_path": ""}
        match, child = route.matches(scope)
        assert match == Match.FULL and child["path_params"] == {"document_id": document_id}


def component_validator(schema: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator of ``components.schemas[name]``, its references resolved in the schema."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": schema["components"]})


def test_the_image_routes_and_their_models_are_declared(schema):
    op = operations(schema)["POST /v1/images/search"]
    assert {"400", "401", "403", "413", "415", "503"} <= set(op["responses"])
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImageSearchRequest")
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ImageSearchResponse"
    )
    components = schema["components"]["schemas"]
    assert {"ImageSearchRequest", "ImageSearchResponse", "ImageHit"} <= set(components)
    for request in ("SearchRequest", "RagRequest"):
        modalities = components[request]["properties"]["modalities"]
        assert modalities["items"]["enum"] == ["text", "image"] and modalities["type"] == "array"
    assert "kind" in components["DocumentStatus"]["properties"]
    assert {"modality", "image_id", "uri"} <= set(components["Citation"]["properties"])


def test_the_model_routes_are_declared_in_openais_shape(schema):
    ops = operations(schema)
    listed = ops["GET /v1/models"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["$ref"].endswith("/ModelList")
    assert not [op for op in ops if op.startswith("GET /v1/models/")]
    card = schema["components"]["schemas"]["ModelCard"]
    assert set(card["required"]) >= {"id", "created", "owned_by"}
    assert card["properties"]["object"]["const"] == "model"


def test_image_search_bodies_validate_against_the_declared_schemas(schema):
    from schemas.api import ImageHit, ImageSearchResponse, SearchHit

    image = ImageHit(
        image_id="i", score=0.9, caption=None, metadata={"color": "red"}, uri=None, thumbnail_b64="x"
    )
    passage = SearchHit(chunk_id="d#0", document_id="d", title=None, text="t", span=(0, 1), score=0.5,
                        metadata={}, modality="text")  # fmt: skip
    for target, hits in (("image", [image]), ("text", [passage])):
        body = ImageSearchResponse(query=None, target=target, k=1, hits=hits, took_ms=1.0)
        errors = list(
            component_validator(schema, "ImageSearchResponse").iter_errors(body.model_dump(mode="json"))
        )
        assert not errors, [e.message for e in errors]
    request = component_validator(schema, "ImageSearchRequest")
    assert request.is_valid({"query": "a red circle", "k": 3})
    assert request.is_valid({"image_b64": "iVBORw0K", "target": "text"})
    assert not request.is_valid({"query": "x", "mode": "vector"})


def test_each_request_example_is_one_its_route_takes(schema):
    """The request bodies' examples (shown in /docs, and the fuzzer's first requests, so each of
    these routes gets at least one request through) are valid for the declared schema and for the
    model the handler parses."""
    import schemas.api

    with_examples = {
        name: component["examples"]
        for name, component in schema["components"]["schemas"].items()
        if "examples" in component
    }
    assert {"SearchRequest", "RagRequest", "EmbeddingsRequest"} <= set(with_examples)
    for name, examples in with_examples.items():
        for example in examples:
            errors = list(component_validator(schema, name).iter_errors(example))
            assert not errors, (name, [e.message for e in errors])
            getattr(schemas.api, name).model_validate(example)
