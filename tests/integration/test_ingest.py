"""Streaming ingestion end to end: real Kafka, real Ray actors, the real MiniLM model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import ray
from kafka import KafkaConsumer

from cluster.kafka_admin import committed_offsets
from cluster.pipeline import EmbedderActor, Pipeline, shard_handles
from cluster.stats import index_stats
from schemas.envelope import DocumentEnvelope
from schemas.ids import chunk_id
from schemas.settings import Settings, load_settings
from schemas.topology import actor_name
from tests.integration.ingest_helpers import (
    expected_chunks,
    kill_mid_stream,
    produce,
    read_stores,
    squad_documents,
)


def ingest_until_idle(settings, timeout_s: float = 600) -> list[dict]:
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        # where the start went, step by step: the embedder loads a model, so it takes time
        core = ["ray", "topics", "embedder", "shards"]
        assert [step for step in pipeline.startup if step in core] == core, pipeline.startup
        assert pipeline.startup["embedder"] > 0, pipeline.startup
        pipeline.wait_idle(timeout_s=timeout_s, interval_s=0.5)
    finally:
        results = pipeline.stop()
    return results


def total(results: list[dict], key: str) -> int:
    return sum(r.get(key, 0) for r in results)


def on_backend(settings: Settings, backend: str, **changes: object) -> Settings:
    """``settings`` with ``index.backend`` (and any other top-level sections) changed."""
    dump = settings.model_dump(mode="json")
    dump["index"]["backend"] = backend
    for section, values in changes.items():
        dump[section].update(values)
    return load_settings(overrides=dump)


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_ingest_2000_update_and_delete(pipeline_settings, backend):
    s = on_backend(pipeline_settings, backend, ingest={"sources": 2})
    docs = squad_documents(2000)
    expected = expected_chunks(s, docs)
    assert produce(s, docs) == 2000

    results = ingest_until_idle(s)
    # Two sources: when the second joins, batches in flight are dropped and read again, so some
    # documents may be embedded twice; what is stored must be exact all the same.
    assert total(results, "documents") >= 2000
    stored = read_stores(s)
    assert stored.per_document == expected
    assert len(stored.chunks) == sum(expected.values())

    # Every chunk id is the deterministic one, and each document's chunks are findable by vector.
    assert set(stored.chunks) == {chunk_id(d, n) for d, c in expected.items() for n in range(c)}
    sample = [f"{d.id}#0" for d in docs[::40]]
    emb = ray.remote(EmbedderActor).options(num_cpus=1).remote(s.embed.model_copy(update={"num_cpus": 2}))
    info = ray.get(emb.describe.remote())
    shards = shard_handles(s, info["model"], info["dim"])
    vectors = ray.get(emb.embed.remote([stored.texts[c] for c in sample]))
    per_shard = ray.get([sh.search.remote(vectors, 1) for sh in shards])
    for row, cid in enumerate(sample):
        best = max((hits[row][0] for hits in per_shard if hits[row]), key=lambda h: h.score)
        assert best.chunk_id == cid
    ray.kill(emb)

    # UPDATE 100 (half of them much shorter), DELETE 100 (half by op, half by tombstone).
    updated = []
    for i, d in enumerate(docs[:100]):
        text = d.text.split(". ")[0] + "." if i % 2 == 0 else d.text + " Updated with more words."
        updated.append(DocumentEnvelope(id=d.id, title=d.title, text=text, metadata={**d.metadata, "v": 2}))
    # Long documents made short must lose their tail chunks everywhere.
    long_docs = [d for d in docs[100:1000] if expected[d.id] > 1][:10]
    assert long_docs, "the corpus has passages longer than one chunk"
    for d in long_docs:
        updated.append(
            DocumentEnvelope(id=d.id, title=d.title, text="Now a single short sentence.", metadata={})
        )
    deleted_op = [d.id for d in docs[1000:1050]]
    deleted_tomb = [d.id for d in docs[1050:1100]]
    produce(s, updated + [DocumentEnvelope(id=i, op="delete") for i in deleted_op], tombstones=deleted_tomb)

    results = ingest_until_idle(s)
    assert total(results, "deletes") == 100
    want = dict(expected)
    want.update(expected_chunks(s, updated))
    for doc_id in deleted_op + deleted_tomb:
        del want[doc_id]
    stored = read_stores(s)
    assert stored.per_document == want
    assert set(stored.chunks) == {chunk_id(d, n) for d, c in want.items() for n in range(c)}  # no stale tail
    for d in long_docs:
        assert stored.texts[f"{d.id}#0"] == "Now a single short sentence."

    stats = index_stats(s)
    assert stats["documents"] == len(want) == 1900
    assert stats["chunks"] == sum(want.values())
    assert stats["lag"] == 0 and stats["dead_letters"]["total"] == 0
    shard_stats = ray.get([sh.stats.remote() for sh in shards])
    assert all(st["vectors"] == st["chunks"] for st in shard_stats)  # the structure mirrors the store


def test_poison_records_go_to_dead_letters_and_the_rest_is_ingested(pipeline_settings):
    s = pipeline_settings.model_copy(
        update={"kafka": pipeline_settings.kafka.model_copy(update={"max_record_bytes": 100_000})}
    )
    good = squad_documents(30)
    produce(s, good[:15])
    from kafka import KafkaProducer

    raw = KafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers, max_request_size=1 << 20)
    topic = s.kafka.topics.documents
    poison = [
        (b"p1", b"{not json", "invalid_json"),
        (b"p2", json.dumps({"kind": "document", "id": "p2"}).encode(), "invalid_envelope"),
        (b"p3", b"\xff\xfe\xfd", "bad_encoding"),
        (b"other", json.dumps({"kind": "document", "id": "p4", "text": "x"}).encode(), "key_mismatch"),
        (
            b"p5",
            json.dumps(
                {"kind": "document", "id": "p5", "text": "y" * (s.kafka.max_record_bytes + 10)}
            ).encode(),
            "too_large",
        ),
        # Poison that passed validation before: each killed the source (and `serve` with it) or
        # stalled its partition for good.
        (
            b"p6",
            b'{"kind": "document", "id": "p6", "text": "x", "metadata": {"n": 9223372036854775808}}',
            "invalid_envelope",
        ),
        (b"p7", b'{"kind": "document", "id": "p7", "text": "x", "metadata": {"score": NaN}}', "invalid_json"),
        (
            b"p8",
            b'{"kind": "document", "id": "p8", "text": "x", "metadata": {"w": -Infinity}}',
            "invalid_json",
        ),
        (b"p9", b'{"kind": "document", "id": "p9", "title": "\\ud800", "text": "x"}', "invalid_envelope"),
        (
            b"p10",
            b'{"kind": "document", "id": "p10", "text": "x", "metadata": {"\\udfff": 1}}',
            "invalid_envelope",
        ),
    ]
    for key, value, _ in poison:
        raw.send(topic, key=key, value=value)
    raw.flush()
    raw.close()
    produce(s, good[15:])

    results = ingest_until_idle(s)
    assert total(results, "documents") == 30
    assert set(read_stores(s).per_document) == {d.id for d in good}

    consumer = KafkaConsumer(
        s.kafka.topics.dead_letter,
        bootstrap_servers=s.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    letters = list(consumer)
    consumer.close()
    assert len(letters) == len(poison)
    by_key = {rec.key: rec for rec in letters}
    for key, value, reason in poison:
        headers = {k: v.decode() for k, v in by_key[key].headers}
        assert by_key[key].value == value  # the original bytes
        assert headers["reason"] == reason
        assert headers["source_topic"] == topic and headers["error"]
        assert int(headers["source_offset"]) >= 0 and headers["source_partition"] in ("0", "1")
    stats = index_stats(s)
    assert stats["dead_letters"]["total"] == len(poison)
    assert stats["dead_letters"]["by_reason"] == dict(Counter(r for _, _, r in poison))
    assert stats["lag"] == 0


def test_restart_resumes_from_committed_offsets_without_re_embedding(pipeline_settings):
    s = pipeline_settings
    docs = squad_documents(300)
    produce(s, docs[:200])
    first = ingest_until_idle(s)
    assert total(first, "documents") == 200
    committed = committed_offsets(s.kafka.bootstrap_servers, s.consumer_group)
    assert sum(sum(p.values()) for p in committed.values()) == 200

    # A restarted pipeline with nothing new reads nothing and embeds nothing.
    idle = ingest_until_idle(s)
    assert total(idle, "records") == 0 and total(idle, "chunks") == 0

    # 100 new documents, and 50 old ones re-sent unchanged: only the new ones are embedded.
    produce(s, docs[200:] + docs[:50])
    second = ingest_until_idle(s)
    assert total(second, "records") == 150
    assert total(second, "documents") == 100
    assert total(second, "unchanged") == 50
    assert read_stores(s).per_document == expected_chunks(s, docs)


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_killing_an_embedder_and_a_shard_mid_stream_loses_and_duplicates_nothing(pipeline_settings, backend):
    s = on_backend(pipeline_settings, backend)
    docs = squad_documents(800)  # batches of at most 256 records: the kill lands between 0.2 and 0.52
    expected = expected_chunks(s, docs)
    produce(s, docs)
    pipeline = Pipeline(s)
    pipeline.start()
    try:
        kill_mid_stream(pipeline, s, s.index.name, s.consumer_group, len(docs))
    finally:
        pipeline.stop()
    stored = read_stores(s)
    assert stored.per_document == expected
    assert len(stored.chunks) == sum(expected.values())
    shards = [
        ray.get_actor(actor_name(s.index.name, "shard", i), namespace=s.ray.namespace) for i in range(2)
    ]
    stats = ray.get([sh.stats.remote() for sh in shards])
    assert [st["vectors"] for st in stats] == [st["chunks"] for st in stats]


def test_vectors_are_normalised_and_match_the_model(pipeline_settings):
    s = pipeline_settings
    docs = squad_documents(5)
    produce(s, docs)
    ingest_until_idle(s)
    from sentence_transformers import SentenceTransformer

    from actors.models import resolve_model

    model = SentenceTransformer(resolve_model(s.embed.model).location, device="cpu")
    ids = list(read_stores(s).chunks)
    records = []
    for i in range(s.index.n_shards):
        shard = ray.get_actor(actor_name(s.index.name, "shard", i), namespace=s.ray.namespace)
        records += [r for r in ray.get(shard.get.remote(ids)) if r is not None]
    assert len(records) == len(ids)
    assert records
    want = model.encode([r.text for r in records], normalize_embeddings=True)
    got = np.stack([r.vector for r in records])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert np.allclose(got, want, atol=1e-4)


def test_a_batch_ingest_with_release_leaves_no_shard_actor_and_its_data_on_disk(pipeline_settings, tmp_path):
    """`riverbed ingest --until-idle --release` (the backfill RayJob's entrypoint): every document
    is stored, and the shard actors are gone at the end, so another cluster can open the stores."""
    import signal

    import yaml

    from cluster.cli import main
    from tests.integration.conftest import _dump

    s = pipeline_settings
    docs = squad_documents(6, prefix="release-")
    produce(s, docs)
    config = tmp_path / "riverbed.yaml"
    config.write_text(yaml.safe_dump(_dump(s)))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["--config", str(config), "ingest", "--until-idle", "--release", "--quiet"]) == 0
    finally:  # the command installs its own; pytest keeps its
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for i in range(s.index.n_shards):
        with pytest.raises(ValueError):
            ray.get_actor(actor_name(s.index.name, "shard", i), namespace=s.ray.namespace)
    assert set(read_stores(s).per_document) == {d.id for d in docs}


def test_an_ingest_alone_refuses_to_start_while_another_consumer_reads_the_index(
    pipeline_settings, tmp_path, capsys
):
    """`riverbed ingest --alone` (the backfill RayJob's entrypoint) refuses while the index's
    consumer group has a member (here a plain consumer standing for another cluster's ingest), and
    the check passes once it has left."""
    import time

    import yaml

    from cluster.cli import main
    from cluster.kafka_admin import refuse_if_consumed
    from schemas.errors import ConfigError
    from tests.integration.conftest import _dump

    s = pipeline_settings
    produce(s, squad_documents(1, prefix="alone-"))
    config = tmp_path / "riverbed.yaml"
    config.write_text(yaml.safe_dump(_dump(s)))
    other = KafkaConsumer(
        s.kafka.topics.documents,
        bootstrap_servers=s.kafka.bootstrap_servers,
        group_id=s.consumer_group,
        client_id="another-cluster",
        enable_auto_commit=False,
    )
    try:
        deadline = time.monotonic() + 60
        while not other.assignment() and time.monotonic() < deadline:
            other.poll(timeout_ms=500)
        assert other.assignment()
        with pytest.raises(ConfigError, match=r"being ingested elsewhere.*1 members \(another-cluster@"):
            refuse_if_consumed(s)
        assert main(["--config", str(config), "ingest", "--alone", "--until-idle"]) != 0
        assert "being ingested elsewhere" in capsys.readouterr().err
    finally:
        other.close()
    refuse_if_consumed(s)  # the group is empty again: a new ingest may start
