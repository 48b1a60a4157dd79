"""Faults of the whole pipeline (real broker, Ray actors, MiniLM, FAISS + SQLite shards): the
broker restarting mid-ingest, a source actor killed, a worker node lost, a shard's disk full.
Afterwards every live document's chunk ids are exactly as the chunker makes them, none twice, the
stores and the FAISS structures agree (counted independently) and nothing is left to consume.
"""

from __future__ import annotations

import json
import os
import signal
import time

import ray

from cluster.kafka_admin import committed_offsets, ensure_topics, topic_specs
from cluster.local_kafka import LocalKafka
from cluster.pipeline import Pipeline
from cluster.stats import index_stats
from schemas.settings import EmbeddedKafkaConfig, load_settings
from schemas.topology import actor_name
from tests.integration.conftest import run_cluster_script
from tests.integration.ingest_helpers import expected_chunks, produce, read_stores, squad_documents


def committed_fraction(settings, n: int) -> float:
    parts = committed_offsets(settings.kafka.bootstrap_servers, settings.consumer_group).values()
    return sum(sum(p.values()) for p in parts) / n


def wait_for_fraction(pipeline, settings, n, fraction, timeout_s=300) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = committed_fraction(settings, n)
        if done >= fraction:
            return done
        pipeline.check_alive()
        time.sleep(0.05)
    raise AssertionError(f"never reached {fraction:.0%} committed: {pipeline.progress()}")


def assert_exact(settings, docs) -> None:
    """The stores hold exactly the chunker's chunks of ``docs``, FAISS agrees, lag is 0."""
    expected = expected_chunks(settings, docs)
    stored = read_stores(settings)  # raises if a chunk id is stored twice
    assert stored.per_document == expected
    shards = [
        ray.get_actor(actor_name(settings.index.name, "shard", i), namespace=settings.ray.namespace)
        for i in (0, 1)
    ]
    stats = ray.get([s.stats.remote() for s in shards])
    assert [s["vectors"] for s in stats] == [s["chunks"] for s in stats]
    assert sum(s["chunks"] for s in stats) == len(stored.chunks)
    summary = index_stats(settings)
    assert summary["lag"] == 0 and summary["documents"] == len(expected)


def test_the_broker_restarting_mid_ingest_loses_and_duplicates_nothing(
    pipeline_settings, tmp_path, cache_dir
):
    kafka = LocalKafka(EmbeddedKafkaConfig(), cache_dir, tmp_path / "kafka")
    state = kafka.start()
    try:
        dump = pipeline_settings.model_dump(mode="json")
        dump["kafka"]["bootstrap_servers"] = state.bootstrap_servers
        s = load_settings(overrides=dump)
        ensure_topics(state.bootstrap_servers, topic_specs(s.kafka.topics))
        docs = squad_documents(600)
        produce(s, docs)
        pipeline = Pipeline(s)
        pipeline.start()
        try:
            stopped_at = wait_for_fraction(pipeline, s, len(docs), 0.2)
            kafka.stop()  # with batches in flight: their commits and dead-letter flushes fail
            time.sleep(8)
            assert kafka.start().bootstrap_servers == state.bootstrap_servers
            pipeline.wait_idle(timeout_s=600, interval_s=0.5)
            assert 0.2 <= stopped_at < 1.0
            assert_exact(s, docs)
        finally:
            pipeline.stop()
    finally:
        kafka.stop()


def test_killing_the_source_actor_mid_stream_loses_and_duplicates_nothing(pipeline_settings):
    s = pipeline_settings
    docs = squad_documents(800)
    produce(s, docs)
    pipeline = Pipeline(s)
    pipeline.start()
    try:
        source = ray.get_actor(actor_name(s.index.name, "source", 0), namespace=s.ray.namespace)
        killed_at = wait_for_fraction(pipeline, s, len(docs), 0.2)
        assert killed_at <= 0.8
        os.kill(ray.get(source.ping.remote()), signal.SIGKILL)
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
    finally:
        pipeline.stop()
    assert_exact(s, docs)


def test_losing_the_node_of_a_shard_and_the_embedder_mid_ingest(pipeline_settings):
    overrides = pipeline_settings.model_dump(mode="json")
    overrides["embed"]["num_cpus"] = 2  # more than the head has: the embedder goes to the worker
    out = run_cluster_script("tests.integration.node_loss", json.dumps(overrides), "400")
    assert out["embedder_on_worker"] and sorted(out["shard_nodes"]) == [False, True], out
    assert 0.2 <= out["removed_at"] < 1.0, out
    assert out["per_document_matches"] and out["chunks"] == out["expected_chunks"], out
    assert out["vectors"] == out["store_chunks"], out


def test_losing_nodes_and_their_disks_loses_nothing_on_milvus_by_uri(pipeline_settings, milvus_server):
    """With a Milvus server as the store a shard keeps nothing on its node: the node running every
    shard and the embedder goes mid-ingest, its disk with it (the index's data directory is
    deleted), and the shards restart on a new node with everything; then the new node goes too,
    mid-query, and every answer is the full one or an error, never a partial result."""
    overrides = pipeline_settings.model_dump(mode="json")
    overrides["embed"]["num_cpus"] = 2
    overrides["index"].update(backend="milvus", milvus={"uri": milvus_server.uri})
    out = run_cluster_script("tests.integration.node_loss", json.dumps(overrides), "300", "--lose-disk")
    assert out["embedder_on_worker"] and out["shard_nodes"] == [True, True], out
    assert 0.2 <= out["removed_at"] < 1.0, out
    assert out["per_document_matches"] and out["chunks"] == out["expected_chunks"], out
    assert out["vectors"] == out["store_chunks"], out
    queries = out["query_loss"]  # (calls to a lost shard are retried once it restarts: most just wait)
    assert queries["shards_on_node"] == [True, True] and queries["shards_moved"] == [True, True], queries
    assert queries["answers_after_loss"] > 20 and queries["partial"] == [], queries
    assert queries["full"] + queries["unavailable"] == queries["answers"] and queries["last_is_full"], queries


def test_a_full_shard_disk_stalls_visibly_loses_nothing_and_resumes(pipeline_settings):
    dump = pipeline_settings.model_dump(mode="json")
    dump["index"]["max_shard_bytes"] = 400_000  # room for a few dozen chunks
    s = load_settings(overrides=dump)
    docs = squad_documents(300)
    produce(s, docs)
    pipeline = Pipeline(s)
    pipeline.start()
    try:
        shards = [
            ray.get_actor(actor_name(s.index.name, "shard", i), namespace=s.ray.namespace) for i in (0, 1)
        ]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            progress = pipeline.progress()
            stalled = [src.get("stalled") or "" for src in progress.sources]
            if any("disk full" in text for text in stalled):
                break
            pipeline.check_alive()
            time.sleep(0.2)
        assert any("disk full" in text for text in stalled), progress.sources
        health = ray.get([sh.health.remote() for sh in shards])
        assert any(h["status"] == "degraded" and "disk full" in (h["problem"] or "") for h in health), health
        assert progress.lag > 0 and progress.sources[0]["retries"]
        time.sleep(3)  # it stays stalled: nothing moves past what the full shard holds
        assert pipeline.progress().lag == progress.lag
        ray.get([sh.set_max_bytes.remote(None) for sh in shards])  # space returns
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        assert all(h["status"] == "ok" for h in ray.get([sh.health.remote() for sh in shards]))
    finally:
        pipeline.stop()
    assert_exact(s, docs)
