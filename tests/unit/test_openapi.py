"""The app's OpenAPI schema as the ingress declares it (deployments/openapi.py), read from the
FastAPI app without serving it: the statuses each route declares, the body of POST
/v1/documents against real envelopes, and the /healthz bodies against ``health_report``'s."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from deployments.ingress import MAX_DOCUMENTS_PER_REQUEST, app
from deployments.metrics import health_report
from deployments.openapi import documents_body

ENVELOPE = {"kind": "document", "id": "a", "text": "some text", "metadata": {"year": 2020}}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return app.openapi()


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
