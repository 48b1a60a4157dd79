"""The two Serve applications a RayService runs (k8s/: ``deployments.app:app_builder`` and
``cluster.serve_app:ingest_builder``, each with the settings as args), deployed from their import
paths' builders on the session's Ray and broker as Serve would deploy them: the ingest app's
pipeline fills the shards the query app reads, and when a source dies Serve's health check
replaces the ingest replica, which resumes from the committed offsets."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from cluster.serving import start_serve
from schemas.topology import actor_name
from tests.integration.conftest import _dump, free_port
from tests.integration.ingest_helpers import produce, squad_documents

N_DOCS = 8
MORE_DOCS = 4


def indexed(url: str, doc_ids: list[str]) -> set[str]:
    """The ids among ``doc_ids`` the query app reports indexed."""
    found = set()
    for doc_id in doc_ids:
        answer = httpx.get(f"{url}/v1/documents/{doc_id}", timeout=60)
        if answer.status_code == 200 and answer.json()["indexed"]:
            found.add(doc_id)
    return found


def wait_indexed(url: str, doc_ids: list[str], timeout_s: float) -> set[str]:
    deadline = time.monotonic() + timeout_s
    found = indexed(url, doc_ids)
    while found != set(doc_ids) and time.monotonic() < deadline:
        time.sleep(2)
        found = indexed(url, doc_ids)
    return found


@pytest.fixture
def apps(pipeline_settings):
    import ray
    from ray import serve

    from cluster.serve_app import ingest_builder
    from deployments.app import app_builder
    from schemas.settings import load_settings

    settings = load_settings(overrides={**_dump(pipeline_settings), "serve": {"port": free_port()}})
    args = _dump(settings)
    start_serve(settings.serve.host, settings.serve.port)
    try:
        serve.run(ingest_builder(args), name="riverbed-ingest", route_prefix=None)
        serve.run(app_builder(args), name="riverbed", route_prefix="/")
        yield settings, f"http://{settings.serve.host}:{settings.serve.port}"
    finally:
        serve.shutdown()
        for i in range(settings.index.n_shards):
            with contextlib.suppress(ValueError):
                ray.kill(
                    ray.get_actor(
                        actor_name(settings.index.name, "shard", i), namespace=settings.ray.namespace
                    )
                )


def test_the_ingest_app_fills_what_the_query_app_serves_and_survives_a_dead_source(apps):
    import ray

    settings, url = apps
    docs = squad_documents(N_DOCS + MORE_DOCS, prefix="k8s-")
    first, more = docs[:N_DOCS], docs[N_DOCS:]
    produce(settings, first)
    ids = [d.id for d in first]
    assert wait_indexed(url, ids, timeout_s=300) == set(ids)
    hits = httpx.post(f"{url}/v1/search", json={"query": first[0].text[:200], "k": 3}, timeout=60).json()[
        "hits"
    ]
    assert first[0].id in {h["document_id"] for h in hits}

    # A source dies for good: the ingest replica's health check fails and Serve replaces it.
    before = ingest_progress()
    assert before["running"], before
    killed_at = time.monotonic()
    source = ray.get_actor(actor_name(settings.index.name, "source", 0), namespace=settings.ray.namespace)
    ray.kill(source, no_restart=True)
    produce(settings, more)
    more_ids = [d.id for d in more]
    assert wait_indexed(url, more_ids, timeout_s=300) == set(more_ids)
    assert indexed(url, ids) == set(ids)  # what was there stays
    after = ingest_progress()
    assert after["running"] and after["elapsed_s"] < time.monotonic() - killed_at  # a run started since


def ingest_progress() -> dict:
    """The ingest replica's own account of its pipeline, through a Serve handle."""
    from ray import serve

    handle = serve.get_deployment_handle("Ingest", app_name="riverbed-ingest")
    with contextlib.suppress(RuntimeError):  # initialised by an earlier call (the same handle)
        handle._init(_run_router_in_separate_loop=True)  # a test has no event loop of its own
    return handle.progress.remote().result()
