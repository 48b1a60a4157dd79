"""`riverbed index copy`: an index ingested by the real pipeline (with updates and deletes) is
copied to a new name on each backend, without re-embedding; the copy answers searches as the
original does, refuses older changes as the original would, and an ingest of the copy resumes
where the original's stopped (it reads only what came after)."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from cluster.index_copy import copy_index
from cluster.kafka_admin import committed_offsets
from cluster.pipeline import EmbedderActor, Pipeline, shard_handles
from cluster.serving import recorded_model
from cluster.stats import index_stats
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError
from schemas.settings import Settings, load_settings
from tests.integration.ingest_helpers import expected_chunks, produce, read_stores, squad_documents

N_DOCS = 120


def ingest_until_idle(settings: Settings) -> list[dict]:
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
    finally:
        results = pipeline.stop()
    return results


def renamed(settings: Settings, name: str, **index: object) -> Settings:
    dump = settings.model_dump(mode="json")
    dump["index"].update(name=name, **index)
    return load_settings(overrides=dump)


@pytest.fixture
def original(pipeline_settings: Settings) -> Settings:
    s = pipeline_settings
    docs = squad_documents(N_DOCS)
    produce(s, docs)
    ingest_until_idle(s)
    updated = [DocumentEnvelope(id=d.id, title=d.title, text="Now one short sentence.") for d in docs[:5]]
    produce(s, [*updated, *(DocumentEnvelope(id=d.id, op="delete") for d in docs[5:10])])
    ingest_until_idle(s)
    return s


def search_all(settings: Settings, vectors: np.ndarray) -> list[list[tuple[str, float]]]:
    """Each query's top 10 over every shard, best first."""
    shards = shard_handles(settings, *recorded_model(settings))
    per_shard = ray.get([sh.search.remote(vectors, 10) for sh in shards])
    merged = []
    for row in range(len(vectors)):
        hits = sorted((h for hits in per_shard for h in hits[row]), key=lambda h: (-h.score, h.chunk_id))
        merged.append([(h.chunk_id, round(h.score, 4)) for h in hits[:10]])
    return merged


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_a_copy_holds_and_answers_what_the_original_does_and_ingest_resumes(original: Settings, backend):
    s = original
    target = renamed(s, f"{s.index.name}-{backend}", backend=backend)
    stored_before = read_stores(s)
    report = copy_index(s, target, page=50)

    assert report.as_dict()["chunks"] == len(stored_before.chunks)
    copied = read_stores(target)
    assert copied.chunks == stored_before.chunks and copied.texts == stored_before.texts
    stats_a, stats_b = index_stats(s), index_stats(target)
    for figure in ("documents", "chunks", "chunks_per_shard", "committed_offsets", "lag"):
        assert stats_b[figure] == stats_a[figure], figure
    assert stats_b["documents"] == N_DOCS - 5

    embedder = (
        ray.remote(EmbedderActor).options(num_cpus=1).remote(s.embed.model_copy(update={"num_cpus": 1}))
    )
    try:
        texts = ["Who won Super Bowl 50?", "capital of Poland", "Now one short sentence."]
        vectors = ray.get(embedder.embed.remote(texts))
    finally:
        ray.kill(embedder)
    assert search_all(target, vectors) == search_all(s, vectors)

    # An ingest of the copy reads only what came after the copied offsets.
    fresh = DocumentEnvelope(
        id="after-the-copy", title="Quokka", text="A quokka crossed the lighthouse road."
    )
    produce(s, [fresh])
    results = ingest_until_idle(target)
    assert sum(r.get("documents", 0) for r in results) == 1
    after = read_stores(target)
    assert after.per_document["after-the-copy"] == expected_chunks(target, [fresh])["after-the-copy"]
    assert set(after.chunks) - set(copied.chunks) == {"after-the-copy#0"}
    assert committed_offsets(s.kafka.bootstrap_servers, target.consumer_group) != committed_offsets(
        s.kafka.bootstrap_servers, s.consumer_group
    )


def test_copying_into_an_index_that_holds_data_or_another_shard_count_is_refused(original: Settings):
    target = renamed(original, f"{original.index.name}-again")
    copy_index(original, target)
    with pytest.raises(ConfigError, match="already holds data"):
        copy_index(original, target)
    with pytest.raises(ConfigError, match="keeps the shard count"):
        copy_index(original, renamed(original, f"{original.index.name}-n", n_shards=3))
    with pytest.raises(ConfigError, match="holds no data"):
        copy_index(renamed(original, f"{original.index.name}-empty"), renamed(original, "elsewhere"))
