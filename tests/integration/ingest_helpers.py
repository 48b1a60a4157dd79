"""Shared by the ingest tests: the sample corpus, producing envelopes, reading the shard stores."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray

from actors.chunker import Chunker
from actors.graph_extract import Extractor, document_graph
from cluster.kafka_admin import committed_offsets
from cluster.producer import EnvelopeProducer
from schemas.envelope import DocumentEnvelope, ImageEnvelope
from schemas.settings import Settings
from schemas.topology import actor_name
from tests.integration.conftest import REPO

Fact = tuple[str, ...]


def squad_documents(n: int | None = None, prefix: str = "") -> list[DocumentEnvelope]:
    docs = []
    with (REPO / "data" / "squad-v1.1-dev" / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.append(
                DocumentEnvelope(
                    id=prefix + row["id"],
                    title=row["title"],
                    text=row["text"],
                    metadata={"title": row["title"], "source": "squad"},
                )
            )
            if n is not None and len(docs) == n:
                break
    return docs


def produce(
    settings: Settings,
    envelopes: Iterable[DocumentEnvelope | ImageEnvelope],
    tombstones: Iterable[str] = (),
    topic: str | None = None,
) -> int:
    """Sends ``envelopes``, then a tombstone per id of ``tombstones``, to ``topic`` (the documents
    topic by default); returns how many the broker acknowledged."""
    assert settings.kafka.bootstrap_servers
    topic = topic or settings.kafka.topics.documents
    producer = EnvelopeProducer(settings.kafka.bootstrap_servers, settings.kafka.max_record_bytes)
    try:
        for env in envelopes:
            producer.send(topic, env)
        for doc_id in tombstones:
            producer.send_tombstone(topic, doc_id)
        return len(producer.flush())
    finally:
        producer.close()


def expected_chunks(settings: Settings, docs: Iterable[DocumentEnvelope]) -> dict[str, int]:
    """Chunks per document as the real chunker cuts them (the pipeline must store exactly these)."""
    chunker = Chunker(settings.chunk, settings.embed.model)
    docs = list(docs)
    return {d.id: len(c.chunks) for d, c in zip(docs, chunker.chunk_batch(docs), strict=True)}


@dataclass(frozen=True)
class StoredIndex:
    chunks: dict[str, str]  # chunk id -> document id
    per_document: dict[str, int]
    texts: dict[str, str]


def read_stores(settings: Settings) -> StoredIndex:
    """Every chunk in every shard of the index, paged through each shard actor's own
    ``scan_chunks`` (whatever its backend; the actors are found, or started, by name)."""
    from cluster.pipeline import shard_handles
    from cluster.serving import recorded_model

    chunks: dict[str, str] = {}
    texts: dict[str, str] = {}
    recorded = recorded_model(settings)
    shards = [] if recorded is None else shard_handles(settings, *recorded)
    for shard in shards:
        after = ""
        while page := ray.get(shard.scan_chunks.remote(after, 2000)):
            for record in page:
                assert record.chunk_id not in chunks, f"chunk {record.chunk_id} stored twice"
                chunks[record.chunk_id] = record.document_id
                texts[record.chunk_id] = record.text
            after = page[-1].chunk_id
    per_document: dict[str, int] = {}
    for doc in chunks.values():
        per_document[doc] = per_document.get(doc, 0) + 1
    return StoredIndex(chunks, per_document, texts)


def kill_mid_stream(pipeline: Any, settings: Settings, index: str, group: str, records: int) -> float:
    """Once ``group`` has committed a fifth of ``records``: kills ``index``'s embedder 0 (Ray
    restarts it) and SIGKILLs the worker of its shard 1, then waits until the pipeline is idle
    again and checks the shard came back in a new process. Returns the share committed when killed
    (asserted between 0.2 and 0.8: mid-stream)."""
    namespace = settings.ray.namespace
    embedder = ray.get_actor(actor_name(index, "embedder", 0), namespace=namespace)
    shard = ray.get_actor(actor_name(index, "shard", 1), namespace=namespace)
    shard_pid = int(ray.get(shard.ping.remote()))
    killed_at = None
    deadline = time.monotonic() + 600
    assert settings.kafka.bootstrap_servers
    while time.monotonic() < deadline:
        committed = committed_offsets(settings.kafka.bootstrap_servers, group)
        done = sum(sum(p.values()) for p in committed.values()) / records
        if done >= 0.2:
            killed_at = done
            ray.kill(embedder, no_restart=False)
            os.kill(shard_pid, signal.SIGKILL)
            break
        pipeline.check_alive()  # a source that failed raises its own error here
        time.sleep(0.05)
    progress = pipeline.progress()
    assert killed_at is not None and 0.2 <= killed_at <= 0.8, (
        f"killed at {killed_at}; lag {progress.lag}, sources {progress.sources}"
    )
    pipeline.wait_idle(timeout_s=900, interval_s=0.5)
    assert int(ray.get(shard.ping.remote())) != shard_pid  # restarted
    return killed_at


def expected_graph(settings: Settings, docs: list[DocumentEnvelope]) -> tuple[Counter[Fact], set[Fact]]:
    """Mentions and relations of ``docs``' graphs, made in this process."""
    chunker = Chunker(settings.chunk, settings.embed.model)
    extractor = Extractor(settings.graph)
    mentions: Counter[Fact] = Counter()
    relations: set[Fact] = set()
    for doc, chunked in zip(docs, chunker.chunk_batch(docs), strict=True):
        facts = extractor.extract([c.text for c in chunked.chunks])
        for g in document_graph(doc.id, doc.title, chunked.chunks, facts):
            mentions.update((g.chunk_id, m.key, m.label, str(m.start), str(m.end)) for m in g.mentions)
            relations.update((g.chunk_id, r.source, r.target, r.label) for r in g.relations)
    return mentions, relations
