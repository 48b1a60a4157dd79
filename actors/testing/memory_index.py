"""InMemoryIndex: the reference ``VectorIndex``, dicts plus numpy brute force.

For fast unit tests of the components around the index (ingest, serving), beside the real
backends in integration tests. It also serves as the oracle of the
contract tests: its search is exact and its filters use :meth:`MetadataFilter.matches`, not SQL.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from actors.vector_index import (
    ChunkRecord,
    DocumentEntry,
    DocumentRow,
    Hit,
    ShardWrite,
    WriteConveniences,
    WriteResult,
    check_queries,
    check_records,
    exact_top_k,
)
from schemas.filters import MetadataFilter
from schemas.ids import split_chunk_id
from schemas.topology import Version, is_older


class InMemoryIndex(WriteConveniences):
    """A ``VectorIndex`` that lives and dies with the object: not durable, and ``snapshot`` and
    ``restore`` do nothing. Writes are atomic (all or nothing) and idempotent like every backend's.
    Thread safety: one lock around every method.
    """

    def __init__(self, model: str, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._model, self._dim = model, dim
        self._lock = threading.Lock()
        self._records: dict[str, ChunkRecord] = {}
        self._documents: dict[str, DocumentRow] = {}
        self._offsets: dict[str, dict[int, int]] = {}
        self._versions: dict[str, Version] = {}
        self._matrix: np.ndarray | None = None  # the stacked vectors of _records, built on demand

    @property
    def model(self) -> str:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    def apply(self, write: ShardWrite) -> WriteResult:
        """Applies ``write`` in :class:`ShardWrite`'s order, skipping the parts of documents whose
        version is older than the stored one; a bad vector changes nothing."""
        records = write.unique_upserts()
        check_records(records, self._dim, f"in-memory index {self._model!r}")
        with self._lock:
            stale = {d for d, v in write.versions.items() if is_older(v, self._versions.get(d))}
            chunks, documents = dict(self._records), dict(self._documents)
            before = len(chunks)
            keep = {d: n for d, n in write.truncate.items() if d not in stale}
            chunks = {c: r for c, r in chunks.items() if r.number < keep.get(r.document_id, r.number + 1)}
            gone = set(write.delete_documents) - stale
            chunks = {c: r for c, r in chunks.items() if r.document_id not in gone}
            for document_id in gone:
                documents.pop(document_id, None)
            for cid in write.delete_chunks:
                if _document_of(cid) not in stale:
                    chunks.pop(cid, None)
            deleted = before - len(chunks)
            live = [r for r in records if r.document_id not in stale]
            unchanged = sum(chunks.get(r.chunk_id) == r for r in live)
            chunks.update((r.chunk_id, r) for r in live)
            documents.update((d, row) for d, row in write.documents.items() if d not in stale)
            self._versions.update((d, v) for d, v in write.versions.items() if d not in stale)
            self._merge_offsets(write.offsets)
            self._records, self._documents, self._matrix = chunks, documents, None
        return WriteResult(len(live) - unchanged, unchanged, deleted, stale=len(stale))

    def _merge_offsets(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        for topic, positions in offsets.items():
            stored = self._offsets.setdefault(topic, {})
            for partition, offset in positions.items():
                stored[int(partition)] = max(stored.get(int(partition), 0), int(offset))

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        """Exact top ``k`` by inner product per query row, best first, filtered by ``matches``."""
        queries = check_queries(vectors, self._dim, k, f"in-memory index {self._model!r}")
        with self._lock:
            records = list(self._records.values())
            if self._matrix is None:
                self._matrix = _stack(records, self._dim)
            keep = [i for i, r in enumerate(records) if filter is None or filter.matches(r.metadata)]
            if not keep:
                return [[] for _ in range(len(queries))]
            scores, positions = exact_top_k(queries, self._matrix[keep], k)
        return [
            [_hit(records[keep[p]], float(s)) for p, s in zip(row_p, row_s, strict=True)]
            for row_p, row_s in zip(positions.tolist(), scores.tolist(), strict=True)
        ]

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        with self._lock:
            return [self._records.get(c) for c in chunk_ids]

    def count(self) -> int:
        return len(self._records)

    def vector_count(self) -> int:
        """The vectors search scores: one per record (the reference has no separate structure)."""
        return len(self._records)

    def document_count(self) -> int:
        return len(self._documents)

    def document_ids(self) -> set[str]:
        with self._lock:
            return {r.document_id for r in self._records.values()}

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(document_ids, 0)
        with self._lock:
            for record in self._records.values():
                if record.document_id in counts:
                    counts[record.document_id] += 1
        return counts

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        with self._lock:
            return {d: self._documents[d] for d in document_ids if d in self._documents}

    def get_document_hashes(self, document_ids: Sequence[str]) -> dict[str, str]:
        return {d: row.content_hash for d, row in self.get_document_rows(document_ids).items()}

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        with self._lock:
            return {d: self._versions[d] for d in document_ids if d in self._versions}

    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]:
        with self._lock:
            return [self._records[c] for c in sorted(c for c in self._records if c > after)[:limit]]

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        with self._lock:
            ids = sorted(d for d in {*self._documents, *self._versions} if d > after)[:limit]
            return [DocumentEntry(d, self._documents.get(d), self._versions.get(d)) for d in ids]

    def offsets(self) -> dict[str, dict[int, int]]:
        with self._lock:
            return {topic: dict(positions) for topic, positions in self._offsets.items()}

    def snapshot(self) -> None:
        """Nothing to do: there is no disk."""

    def restore(self) -> None:
        """Nothing to do: there is no disk."""

    def close(self) -> None:
        """Nothing to release."""


def _document_of(chunk_id: str) -> str | None:
    try:
        return split_chunk_id(chunk_id)[0]
    except ValueError:
        return None


def _stack(records: list[ChunkRecord], dim: int) -> np.ndarray:
    return np.stack([r.vector for r in records]) if records else np.zeros((0, dim), np.float32)


def _hit(record: ChunkRecord, score: float) -> Hit:
    return Hit(
        chunk_id=record.chunk_id,
        document_id=record.document_id,
        number=record.number,
        text=record.text,
        title=record.title,
        start=record.start,
        end=record.end,
        metadata=dict(record.metadata),
        score=score,
        alignment=record.alignment,
    )
