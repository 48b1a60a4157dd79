"""Shared by the ingest tests: the sample corpus, producing envelopes, reading the shard stores."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from actors.chunker import Chunker
from actors.index_shard import shard_directory
from actors.shard_store import ShardStore
from cluster.producer import EnvelopeProducer
from schemas.envelope import DocumentEnvelope
from schemas.settings import Settings
from tests.integration.conftest import REPO


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


def produce(settings: Settings, envelopes: Iterable[DocumentEnvelope], tombstones: Iterable[str] = ()) -> int:
    assert settings.kafka.bootstrap_servers
    producer = EnvelopeProducer(settings.kafka.bootstrap_servers, settings.kafka.max_record_bytes)
    try:
        for env in envelopes:
            producer.send(settings.kafka.topics.documents, env)
        for doc_id in tombstones:
            producer.send_tombstone(settings.kafka.topics.documents, doc_id)
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
    """Every chunk in every shard store of the index, read directly from SQLite."""
    chunks: dict[str, str] = {}
    texts: dict[str, str] = {}
    for i in range(settings.index.n_shards):
        store = ShardStore.read_only(shard_directory(settings.data_dir, i))
        try:
            for cid, doc, text in store._conn.execute("SELECT chunk_id, document_id, text FROM chunks"):
                assert cid not in chunks, f"chunk {cid} stored twice"
                chunks[cid] = doc
                texts[cid] = text
        finally:
            store.close()
    per_document: dict[str, int] = {}
    for doc in chunks.values():
        per_document[doc] = per_document.get(doc, 0) + 1
    return StoredIndex(chunks, per_document, texts)
