"""What the app's OpenAPI schema (``/openapi.json``) declares beyond what FastAPI infers from the
handlers: every error status each route answers, the body of ``POST /v1/documents`` (its handler
reads the body raw), and the bodies of ``/healthz`` and ``/metrics``.

Client generators and fuzzers read that schema, so it names every status a route can answer and
no status it never does: FastAPI's own 422 is dropped, since validation errors here are 400s in
the error shape, and an app with no API keys declares no key requirement, 401 or 403. Any route
may answer 400 (a Host header the app does not serve) and 413 (a body over
``serve.max_body_bytes``): the edge middleware answers those before any handler runs.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter

from deployments.edge import keyring
from schemas.api import ErrorDetail, ErrorResponse
from schemas.envelope import Envelope

Responses = dict[int | str, dict[str, Any]]

_REASONS = {
    400: "bad input: the field (`param`) and the reason; or a Host header this app does not serve",
    401: "no API key, or one this app does not know",
    403: "the API key lacks the route's scope",
    404: "what the request names does not exist (`param` says which)",
    413: "body too large",
    415: "the body is not application/json",
    503: "the index is not ready, a shard is unavailable, or the broker did not take the documents",
}


def errors(*statuses: int) -> Responses:
    """The ``responses=`` of a route that may answer each of ``statuses`` in the error shape."""
    return {status: {"model": ErrorResponse, "description": _REASONS[status]} for status in statuses}


def _json_errors(*statuses: int) -> Responses:
    """:func:`errors` for a route whose own answers are not JSON: FastAPI would document a model
    of ``responses=`` in the route's media type, so the error body's schema is spelt out."""
    content = {"application/json": {"schema": _inline(ErrorResponse.model_json_schema())}}
    return {status: {"description": _REASONS[status], "content": content} for status in statuses}


BODY_ERRORS = errors(400, 401, 403, 413, 415, 503)
"""A route that takes a JSON body and a key."""
PATH_ERRORS = errors(400, 401, 403, 413, 503)
"""A GET or DELETE that takes a key (no body, so never 415)."""
GRAPH_GET_ERRORS = errors(400, 401, 403, 404, 413, 503)
"""A graph GET: an entity it names may not exist."""
GRAPH_BODY_ERRORS = errors(400, 401, 403, 404, 413, 415, 503)
"""A graph query: an entity it names may not exist."""

_HEALTH_FIELDS: dict[str, Any] = {
    "status": {"type": "string", "enum": ["ok", "degraded", "unavailable"]},
    "index": {"type": "string"},
    "shards": {"type": "integer", "description": "shards the index has"},
    "chunks": {"type": "integer"},
    "vectors": {"type": "integer"},
    "sources": {"type": "integer", "description": "ingest sources running"},
    "problems": {
        "type": "array",
        "items": {"type": "string"},
        "description": "each shard or source in trouble",
    },
}


def _health(description: str, *, error: bool) -> dict[str, Any]:
    fields = {**_HEALTH_FIELDS, **({"error": ErrorDetail.model_json_schema()} if error else {})}
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


HEALTH_RESPONSES: Responses = {
    200: _health("every shard is ok and no running source is stalled", error=False),
    503: _health("a shard is unavailable or in trouble, or a source is stalled: see `problems`", error=True),
    **errors(400, 413),
}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (pydantic's JSON schema) with each ``#/$defs/X`` reference replaced by ``X``, so it
    can sit inside an OpenAPI operation. Pydantic's discriminator mapping names those references,
    so it goes too (each variant's ``kind`` constant tells them apart)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(copy.deepcopy(defs[node["$ref"].removeprefix("#/$defs/")]))
            return {k: resolve(v) for k, v in node.items() if k not in ("$defs", "discriminator")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


METRICS_RESPONSES = _json_errors(400, 401, 403, 413)
"""``/metrics``: Prometheus text (its ``response_class``), or an error in JSON."""


def documents_body(max_documents: int) -> dict[str, Any]:
    """The ``openapi_extra`` of ``POST /v1/documents``: one envelope, a list of 1 to
    ``max_documents`` of them, or ``{"documents": [...]}``; each envelope names its ``kind``."""
    envelope = _inline(TypeAdapter(Envelope).json_schema())
    for variant in envelope["oneOf"]:
        variant["required"] = [*variant.get("required", []), "kind"]
    many = {"type": "array", "items": envelope, "minItems": 1, "maxItems": max_documents}
    batch = {"type": "object", "properties": {"documents": many}, "required": ["documents"]}
    schema = {"anyOf": [envelope, many, batch]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def serve_openapi(app: FastAPI) -> None:
    """Makes ``app`` serve its OpenAPI schema as it answers: without the 422 FastAPI declares on
    every route with parameters (and the models only that 422 used); and, when no API keys are
    configured as the schema is first asked for (the replica configures them at start), without
    the key requirements, their schemes and the 401 and 403 no route of an open app answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            drop = {"422", *(() if keyring().enabled else ("401", "403"))}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for status in drop:
                        operation.get("responses", {}).pop(status, None)
                    if not keyring().enabled:
                        operation.pop("security", None)
            components = schema.get("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            if not keyring().enabled:
                components.pop("securitySchemes", None)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]
