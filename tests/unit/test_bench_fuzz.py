"""`bench fuzz`'s pure parts: the error-shape check, schemathesis' settings, the bench's app
settings and its report files. The fuzzing of the live app is tests/integration/test_fuzz.py."""

from __future__ import annotations

import json

import pytest
import requests
from schemathesis import Response

from cluster.bench.fuzz import (
    CHECKS,
    INDEX,
    FuzzRun,
    error_shape,
    fuzz_config,
    fuzz_settings,
    write_fuzz_report,
)
from schemas.settings import load_settings


def response(status: int, body: bytes, content_type: str = "application/json") -> Response:
    request = requests.Request("POST", "http://127.0.0.1:8000/v1/search").prepare()
    headers = {"content-type": [content_type]}
    return Response(
        status_code=status, headers=headers, content=body, request=request, elapsed=0.0, verify=True
    )


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error": {"code": "invalid_request", "message": "k: bad", "param": "k"}}'),
        (
            503,
            b'{"status": "unavailable", "error": {"code": "unavailable", "message": "m", "param": null}}',
        ),
        (200, b"anything"),
    ],
)
def test_the_error_shape_check_passes_shaped_errors_and_successes(status, body):
    assert error_shape(None, response(status, body), None) is None


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (422, b'{"detail": [{"loc": ["body"], "msg": "x"}]}'),  # FastAPI's own shape
        (500, b"Internal Server Error"),
        (401, b'{"error": {"code": "unauthorized", "message": "no key"}}'),  # param missing
        (404, b'{"error": {"code": 404, "message": "m", "param": null}}'),
    ],
)
def test_the_error_shape_check_fails_any_other_error_body(status, body):
    with pytest.raises(AssertionError, match="error shape"):
        error_shape(None, response(status, body, "text/plain"), None)


def test_schemathesis_runs_the_contracts_checks_only_with_the_key_as_bearer():
    config = fuzz_config("k" * 20, max_examples=7, seed=3).projects.get_default()
    checks = config.checks
    for name in CHECKS:
        assert getattr(checks, name).enabled, name
    assert not checks.positive_data_acceptance.enabled
    assert "413" in checks.negative_data_rejection.expected_statuses
    assert config.generation.max_examples == 7
    assert fuzz_config(None, 7, 3).projects.get_default().auth.is_defined is False
    assert config.auth.is_defined


def test_the_bench_app_has_its_own_index_on_loopback_with_one_key_or_none():
    base = load_settings()
    keyed = fuzz_settings(base, "s" * 32)
    assert keyed.index.name == INDEX and keyed.kafka.topics.documents != base.kafka.topics.documents
    assert keyed.serve.host == "127.0.0.1"
    [key] = keyed.serve.auth.keys
    assert key.key.get_secret_value() == "s" * 32 and key.scopes == ["read", "write"]
    assert fuzz_settings(base, None).serve.auth.keys == []


def test_the_report_has_a_row_per_client_and_route_and_each_failure_in_full(tmp_path):
    ok, bad = FuzzRun("key"), FuzzRun("no key")
    ok.route("POST /v1/search").requests = 3
    ok.route("POST /v1/search").statuses.update({200: 2, 400: 1})
    ok.route("POST /v1/search").codes["invalid_request"] = 1
    failure = {"check": "not_a_server_error", "title": "Server error", "status": 500, "message": "boom",
               "curl": "curl -X POST http://127.0.0.1/v1/rag", "count": 2}  # fmt: skip
    bad.route("POST /v1/rag").failures["not_a_server_error: Server error"] = failure
    bad.errors.append("POST /v1/rag: Network Error: timed out")
    runs = [ok.to_json(), bad.to_json()]
    result = {"command": "riverbed bench fuzz --examples 5", "schemathesis": "4", "max_examples": 5,
              "checks": ["error_shape"], "failures": bad.failures, "runs": runs}  # fmt: skip
    md = write_fuzz_report(tmp_path, result).read_text()
    assert "| key | POST /v1/search | 3 | 200: 2, 400: 1 | invalid_request: 1 | 0 |" in md
    assert "| no key | POST /v1/rag | 0 | - | - | 1 |" in md
    assert "not_a_server_error (2 times): boom" in md and "curl -X POST http://127.0.0.1/v1/rag" in md
    assert "timed out" in md
    assert json.loads((tmp_path / "fuzz.json").read_text())["runs"][1]["failures"] == 2
