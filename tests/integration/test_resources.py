"""What an index holds of Ray's logical CPUs once its work has ended, and what happens when a new
embedder cannot be placed: idle indexes must not crowd out the next one, and a command must never
wait forever for CPUs that another index holds."""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
import ray

from cluster.pipeline import EmbedderActor, _await_embedder, shard_handles
from cluster.ray_actors import actor_rows
from cluster.serving import start_serve, start_serving
from schemas.errors import ConfigError
from schemas.settings import load_settings
from schemas.topology import actor_name
from tests.integration.conftest import free_port


def cpus_held_by(names: list[str], namespace: str) -> float:
    """The logical CPUs Ray holds for the live actors named ``names``, from each actor's own
    resource request in the GCS (so work elsewhere in the session cannot move the number)."""
    alive = [r for r in actor_rows(namespace) if r.state == "ALIVE"]
    held = {r.name: r.cpus for r in alive if r.name in names}
    assert set(held) == set(names), f"not alive: {sorted(set(names) - set(held))}"
    return sum(held.values())


def test_the_idle_shards_of_many_indexes_hold_almost_no_cpu(pipeline_settings):
    names = []
    try:
        for _ in range(10):  # ten idle indexes of two shards each (before: 0.05 CPU per shard)
            dump = pipeline_settings.model_dump(mode="json")
            dump["index"]["name"] = f"idle{uuid.uuid4().hex[:8]}"
            s = load_settings(overrides=dump)
            shard_handles(s, "sentence-transformers/all-MiniLM-L6-v2", 384)
            names += [actor_name(s.index.name, "shard", i) for i in range(2)]
        held = cpus_held_by(names, pipeline_settings.ray.namespace)
        assert 0 < held <= 0.05, f"20 idle shards hold {held} CPUs"
    finally:
        for name in names:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=pipeline_settings.ray.namespace))


def test_an_embedder_that_cannot_be_placed_is_refused_naming_who_holds_the_cpus(pipeline_settings):
    s = pipeline_settings
    cpus = ray.cluster_resources().get("CPU", 0.0) + 1  # more than the whole session's Ray
    embedder = (
        ray.remote(EmbedderActor)
        .options(name=actor_name(s.index.name, "embedder", 0), num_cpus=cpus)
        .remote(s.embed.model_copy(update={"num_cpus": cpus}))
    )
    with pytest.raises(ConfigError) as refused:
        _await_embedder(s, embedder, cpus, patience_s=3.0)
    message = str(refused.value)
    assert f"index {s.index.name!r} needs {cpus:g} logical CPUs" in message and "held by" in message


def test_a_serve_start_refused_after_its_ingest_started_stops_that_ingest(pipeline_settings):
    """`riverbed serve --ingest` starts the pipeline before it deploys the app; when the deploy is
    refused (here: a generator asking for more CPUs than Ray has), the embedders and sources it
    started must not live on holding their CPUs (they would refuse every later index's)."""
    s = pipeline_settings
    too_many = ray.cluster_resources().get("CPU", 0.0) + 1
    dump = s.model_dump(mode="json")
    dump["serve"] = {"port": free_port(), "generator": {"num_cpus": too_many}}
    settings = load_settings(overrides=dump)
    with pytest.raises(ConfigError, match=r"serve\.generator\.num_cpus") as refused:
        start_serving(settings, ingest=True)
    # The traceback holds the failed start's handles (as a caller's would): without the stop they
    # keep its actors alive, which is what this test must see.
    assert refused.traceback is not None
    groups = {settings.index.name, settings.image_side().index.name}

    def left() -> list[str]:
        rows = actor_rows(s.ray.namespace)
        return [r.name for r in rows if r.group in groups and r.role in ("embedder", "source")]

    deadline = time.monotonic() + 20  # a killed actor is DEAD a moment later
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == [], "the refused start left its ingest running"


def test_serve_moves_to_the_asked_address_when_no_app_runs_there(ray_session):
    """Ray Serve keeps one HTTP address per cluster and ``serve.start`` silently keeps a running
    controller's: a command that left Serve up with no app (``Serving.stop`` deletes only the app)
    made the next `riverbed serve` on another port wait for a /healthz that nothing answered."""
    from ray import serve
    from ray.serve.context import _get_global_client

    first, second = free_port(), free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": first})
        start_serve("127.0.0.1", second)
        client = _get_global_client()
        assert client is not None and client.http_config.port == second
    finally:
        serve.shutdown()


def test_an_ingest_refused_for_its_embedders_cpus_stops_the_sources_it_started(pipeline_settings):
    """The sources are built while the embedder waits for its CPUs and loads its model; when the
    embedder is refused, the start must stop them as well: a live source makes the index look
    ingested ("an ingest is already running") to every later start."""
    from cluster.pipeline import Pipeline, running_source

    s = pipeline_settings
    too_many = ray.cluster_resources().get("CPU", 0.0) + 1
    dump = s.model_dump(mode="json")
    dump["embed"]["num_cpus"] = too_many
    settings = load_settings(overrides=dump)
    pipeline = Pipeline(settings)
    with pytest.raises(ConfigError, match=r"needs .* logical CPUs"):
        pipeline.start()
    deadline = time.monotonic() + 20  # a killed actor is DEAD a moment later
    while running_source(settings) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running_source(settings) is None, "the refused start left its sources running"
    assert pipeline.sources == [] and pipeline.embedders == []
