"""`bench load`'s traffic against the live app with keys on (real broker, pipeline, models): what the
bench counts per route and status is what the server's own /metrics counted, a run stops on its
request count, keys are sent (a wrong one is counted as errors), and the posted documents are
deleted again (the index ends with the chunks it began with)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.bench.load import METHODS, MIX, TURN_REQUESTS, Workload, mix_cycle, run_level, search_phase
from cluster.bench.load_report import Phase, summarize
from cluster.bench.query import load_queries
from tests.integration.conftest import REPO, ServedIndex, served_index

KEY = f"bench-load-{uuid.uuid4().hex}"
TEMPLATES = {
    "search": "/v1/search",
    "rag": "/v1/rag",
    "embeddings": "/v1/embeddings",
    "bulk embeddings": "/v1/embeddings",
    "documents post": "/v1/documents",
    "documents delete": "/v1/documents/{document_id:anypath}",
}
"""The server's label for each of the bench's routes (its route templates)."""


@pytest.fixture(scope="module")
def app(broker, ray_session, tmp_path_factory) -> Iterator[ServedIndex]:
    keys = [{"key": KEY, "scopes": ["read", "write"]}]
    with served_index(broker, tmp_path_factory, 40, "load", {"auth": {"keys": keys}}) as served:
        yield served


def server_counts(url: str) -> Counter[tuple[str, str, str]]:
    """Requests the app answered, by (route template, method, status), from its /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "riverbed_http_requests_total" and s.labels["route"] in TEMPLATES.values():
                counts[(s.labels["route"], s.labels["method"], s.labels["status"])] = int(s.value)
    return counts


def bench_counts(phases: list[Phase]) -> Counter[tuple[str, str, str]]:
    return Counter((TEMPLATES[s.route], METHODS[s.route], str(s.status)) for p in phases for s in p.samples)


def chunks(url: str) -> int:
    return int(httpx.get(f"{url}/healthz", timeout=60).json()["chunks"])


def requests_fitting(n: int) -> int:
    """Requests in the longest prefix of the mix's cycle that fits in ``n``."""
    sent = 0
    for kind in mix_cycle(MIX):
        if sent + TURN_REQUESTS[kind] > n:
            break
        sent += TURN_REQUESTS[kind]
    return sent


def test_a_short_run_counts_what_the_server_counted_and_leaves_the_index_as_it_was(app):
    questions = load_queries(REPO / "data" / "squad-v1.1-dev", 200)
    work = Workload(questions[:150], questions[150:182], "vector", 5)
    chunks_before, counted_before = chunks(app.url), server_counts(app.url)

    levels = [asyncio.run(run_level(app.url, KEY, work, c, 2.0, 10_000)) for c in (1, 2)]
    capped = asyncio.run(run_level(app.url, KEY, work, 2, 600.0, 7))  # stops on its count, not its time
    alone = asyncio.run(search_phase(app.url, KEY, work, 2, 1.0, 10_000, bulk=False))
    with_bulk = asyncio.run(search_phase(app.url, KEY, work, 2, 0.5, 10_000, bulk=True))
    last_posted = f"bench-load/{work.run}/{work.documents}"
    wrong_key = asyncio.run(run_level(app.url, "not-the-key-" + KEY, work, 1, 600.0, 5))

    phases = [*levels, capped, alone, with_bulk, wrong_key]
    counted = server_counts(app.url)
    assert bench_counts(phases) == counted - counted_before  # every request, by route and status

    result = summarize([*levels, capped], alone, with_bulk, bulk_inputs=len(work.bulk))
    failed = Counter((s.route, s.status, s.code) for p in phases[:-1] for s in p.samples if s.code)
    assert result["errors"] == 0 and result["shed"] == 0 and not failed, failed
    routes = {route for level in result["levels"] for route in level["routes"]}
    assert routes == {"search", "rag", "embeddings", "documents post", "documents delete"}
    assert result["bulk"]["bulk_requests"] >= 1 and result["bulk"]["p99_ratio"] is not None
    assert len(capped.samples) == requests_fitting(7)
    # a key the app does not know: every request refused, and counted as an error
    assert {s.status for s in wrong_key.samples} == {401}
    assert summarize([wrong_key], alone, with_bulk, 1)["errors"] == len(wrong_key.samples)
    assert len(wrong_key.samples) == requests_fitting(5)

    # every posted document was deleted again, once ingest has caught up
    assert app.serving.pipeline is not None
    app.serving.pipeline.wait_idle(timeout_s=300, interval_s=0.5)
    assert chunks(app.url) == chunks_before
    status = httpx.get(
        f"{app.url}/v1/documents/{quote(last_posted, safe='')}",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert status.status_code == 200 and status.json()["indexed"] is False


def test_the_official_openai_client_sends_its_api_key_as_the_bearer_key(app):
    import openai

    texts = ["The Broncos won Super Bowl 50.", "Warsaw is the capital of Poland."]
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key=KEY, max_retries=0)
    response = client.embeddings.create(model=app.settings.embed.model, input=texts)
    assert [d.index for d in response.data] == [0, 1] and len(response.data[0].embedding) == 384
    stranger = openai.OpenAI(base_url=f"{app.url}/v1", api_key="not-the-key-" + KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.embeddings.create(model=app.settings.embed.model, input=texts)
