"""IndexShard: the logic of one index shard actor (``<index>/shard/<i>``) around a backend.

Writes are durable when :meth:`apply` returns (the backend's store committed them). The FAISS
structure is snapshotted at most every ``index.snapshot_every_s`` seconds after a write, and on
:meth:`close`; a restarted shard loads the snapshot and replays only the store's later writes.
Thread safety: the backend serialises its own calls; the snapshot clock is guarded here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.faiss_index import FaissIndex
from actors.vector_index import (
    ChunkRecord,
    DocumentRow,
    Hit,
    KeywordSearch,
    ShardWrite,
    VectorIndex,
    WriteResult,
)
from schemas.errors import ConfigError, IndexUnavailableError
from schemas.filters import MetadataFilter
from schemas.settings import IndexConfig

log = logging.getLogger(__name__)


def shard_directory(data_dir: Path, shard: int) -> Path:
    return data_dir / f"shard-{shard:03d}"


class IndexShard:
    def __init__(self, config: IndexConfig, data_dir: Path, shard: int, model: str, dim: int) -> None:
        self.config = config
        self.shard = shard
        self.path = shard_directory(data_dir, shard)
        self.model = model
        self.dim = dim
        self._index: VectorIndex | None = None
        self._lock = threading.Lock()
        self._last_snapshot = time.monotonic()
        self._dirty = False

    def warm_up(self) -> None:
        """Opens the backend (restoring its structure from snapshot + store). Idempotent."""
        if self._index is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._index = FaissIndex(self.path, self.model, self.dim, self.config.faiss)

    @property
    def index(self) -> VectorIndex:
        if self._index is None:
            raise IndexUnavailableError(f"shard {self.shard} ({self.path}) is not open")
        return self._index

    def apply(self, write: ShardWrite) -> WriteResult:
        result = self.index.apply(write)
        with self._lock:
            self._dirty = True
            due = time.monotonic() - self._last_snapshot >= self.config.snapshot_every_s
        if due:
            self.snapshot()
        return result

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        return self.index.search(vectors, k, filter)

    def keyword_search(
        self, queries: Sequence[str], k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[list[Hit]]:
        return self._keyword.keyword_search(queries, k, filter, title_weight)

    def metadata_fields(self) -> set[str]:
        return self._keyword.metadata_fields()

    def documents(self, document_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each id: ``chunks`` stored in THIS shard, and, when this shard holds the
        document's row (its registry shard), ``content_hash``, ``n_chunks`` and ``source``."""
        index = self.index
        counts = index.document_chunk_counts(document_ids)
        rows = index.get_document_rows(document_ids)
        out: dict[str, dict[str, Any]] = {}
        for doc_id in document_ids:
            info: dict[str, Any] = {"chunks": counts.get(doc_id, 0)}
            row = rows.get(doc_id)
            if row is not None:
                info.update(content_hash=row.content_hash, n_chunks=row.n_chunks, source=row.source)
            out[doc_id] = info
        return out

    @property
    def _keyword(self) -> KeywordSearch:
        index = self.index
        if not isinstance(index, KeywordSearch):
            raise ConfigError(f"shard {self.shard}: backend {type(index).__name__} has no keyword search")
        return index

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        return self.index.get(chunk_ids)

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        return self.index.get_document_rows(document_ids)

    def count(self) -> int:
        return self.index.count()

    def stats(self) -> dict[str, Any]:
        index = self.index
        vectors = index.vector_count() if isinstance(index, FaissIndex) else index.count()
        return {
            "shard": self.shard,
            "chunks": index.count(),
            "vectors": vectors,
            "documents": len(index.document_ids()),
            "offsets": index.offsets(),
            "path": str(self.path),
        }

    def snapshot(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._last_snapshot = time.monotonic()
        self.index.snapshot()

    def close(self) -> None:
        if self._index is not None:
            self.snapshot()
            self._index.close()
            self._index = None
