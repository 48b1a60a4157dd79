"""Schemathesis against the live app's OpenAPI schema (cluster/bench/fuzz.py, with a bounded
example count here; `riverbed bench fuzz` runs longer): every route, with a read+write key and
without one, under the contract's checks (no 5xx, every 4xx and 5xx in the error shape, statuses,
content types and bodies as the schema declares them, input the schema forbids refused).

One app with keys covers "with and without keys": the key run's requests reach every handler as
they would on an app with no keys configured (the key check passes and changes nothing else), and
its ``ignored_auth`` check sends each route's request again with no key and with a made-up key; the
keyless run then fuzzes every route without a key. An app with no keys at all differs only in the
edge's key check, whose open mode tests/unit/test_edge.py covers.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from cluster.bench.fuzz import FuzzRun, fuzz
from tests.integration.conftest import ImageModel, ServedIndex, served_index

N_DOCS = 20
KEY = "fuzz-test-key-" + "k" * 18
EXAMPLES = 40
"""Examples per route in each of schemathesis' phases: the two runs take about a minute together."""
OPEN_ROUTES = {"GET /healthz"}
NAMES_AN_ENTITY = {"GET /v1/graph/entities/{name}", "POST /v1/graph/query"}
"""Routes whose requests name graph entities: the fuzzer's made-up names are rarely in the graph, so
a 404 ``not_found`` (the graph was asked and has no such entity) counts as getting through."""
BEFORE_THE_KEY = {"unsupported_media_type", "method_not_allowed"}
"""What the edge answers a keyless request before it looks for a key: a body that is not JSON, and
a method the path does not serve (schemathesis tries those on every route)."""


@pytest.fixture(scope="module")
def app(broker, ray_session, tmp_path_factory, image_model: ImageModel) -> Iterator[ServedIndex]:
    """Every part the app can serve is there, so every route reaches its real handler: the text
    index, a trained image model with its (empty) images index, and the knowledge graph."""
    keys = [{"key": KEY, "scopes": ["read", "write"]}]
    with served_index(
        broker,
        tmp_path_factory,
        N_DOCS,
        prefix="fuzz",
        serve_overrides={"auth": {"keys": keys}},
        overrides={"graph": {"enabled": True}, "images": {"ingest": True, **image_model.images}},
    ) as served:
        yield served


@pytest.fixture(scope="module")
def routes(app: ServedIndex) -> set[str]:
    """Every operation of the schema the app serves, as ``METHOD /path``."""
    paths = httpx.get(f"{app.url}/openapi.json", timeout=60).json()["paths"]
    return {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations}


def report(run: FuzzRun) -> str:
    """The run's failures and errors, one per line, for an assertion message."""
    lines = [
        f"{label}: {f['check']} (status {f['status']}, {f['count']} times): {f['message']}\n  {f['curl']}"
        for label, tally in sorted(run.routes.items())
        for f in tally.failures.values()
    ]
    return "\n".join([*lines, *run.errors])


def test_with_a_read_write_key_every_route_keeps_the_contract(app, routes):
    run = fuzz(app.url, "key", KEY, EXAMPLES)
    assert run.failures == 0, report(run)
    assert routes <= set(run.routes), f"routes never fuzzed: {routes - set(run.routes)}"
    for label in routes:
        tally = run.routes[label]
        through = sum(n for s, n in tally.statuses.items() if 200 <= s < 300)
        if label in NAMES_AN_ENTITY:
            through += tally.codes["not_found"]
        assert through > 0, (
            f"{label}: no request got through: {tally.statuses}, codes {tally.codes}, "
            f"phases skipped {tally.skipped}"
        )


def test_without_a_key_every_guarded_route_answers_401(app, routes):
    run = fuzz(app.url, "no key", None, EXAMPLES)
    assert run.failures == 0, report(run)
    assert routes <= set(run.routes), f"routes never fuzzed: {routes - set(run.routes)}"
    for label in routes - OPEN_ROUTES:
        tally = run.routes[label]
        assert not any(s < 400 for s in tally.statuses), f"{label} answered without a key: {tally.statuses}"
        assert tally.codes["unauthorized"] > 0, tally.codes
        assert set(tally.codes) <= {"unauthorized", *BEFORE_THE_KEY}, f"{label}: {tally.codes}"
    healthz = run.routes["GET /healthz"].statuses
    assert healthz[200] > 0, f"/healthz needs no key: {healthz}"
