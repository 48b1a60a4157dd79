"""IndexShard: the logic of one index shard actor (``<index>/shard/<i>``) around its backend.

- The store is the backend ``index.backend`` names (:mod:`actors.backends`); this class never
  touches its files.
- Writes are durable when :meth:`IndexShard.apply` returns (the backend's store committed them).
  The backend is snapshotted at most every ``index.snapshot_every_s`` seconds after a write, and
  on :meth:`IndexShard.close` (FAISS: its structure, so that a restarted shard loads it and
  replays only the store's later writes; Milvus: a flush, which keeps searches fast).
- Availability: given the consumer group's committed offsets, a shard whose store applied less
  than was committed (its data is on another node, or lost) is *unavailable*: it does not create
  or open its store, every read and write raises :class:`IndexUnavailableError` saying why and
  what to do, and :meth:`IndexShard.health` reports it (see :mod:`actors.shard_identity`).
- Health: a write that fails for a reason that may pass (disk full, locked, I/O) leaves the
  shard *degraded* with that problem until a write succeeds. :meth:`IndexShard.health` and
  :meth:`IndexShard.stats` are O(1): they read counters, never scan chunks or documents.

Thread safety: the backend serialises its own calls; the snapshot clock and opening are guarded
here, so a Ray actor may call any method from several threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.backends import ShardBackend, StoreUnreadableError, backend_for
from actors.shard_identity import (
    StoreIdentity,
    committed_problem,
    identity_problem,
    read_identity,
    write_identity,
)
from actors.vector_index import ChunkRecord, DocumentEntry, DocumentRow, Hit, ShardWrite, WriteResult
from schemas.errors import IndexUnavailableError, RetryableError
from schemas.filters import MetadataFilter
from schemas.settings import IndexConfig
from schemas.topology import Offsets, Version, shard_directory

__all__ = ["IndexShard", "shard_directory"]

log = logging.getLogger(__name__)


class IndexShard:
    """Shard ``shard`` of index ``index_name``, stored in ``shard_directory(data_dir, shard)``.

    ``committed``: the consumer group's committed offsets, checked against what the store applied
    (None: not checked, e.g. the broker could not be asked). Nothing is opened until
    :meth:`warm_up`.
    """

    def __init__(
        self,
        config: IndexConfig,
        data_dir: Path,
        shard: int,
        model: str,
        dim: int,
        *,
        index_name: str = "",
        committed: Offsets | None = None,
    ) -> None:
        self.config = config
        self.shard = shard
        self.path = shard_directory(data_dir, shard)
        self.model = model
        self.dim = dim
        self.index_name = index_name
        self.backend = backend_for(config)
        self._index: ShardBackend | None = None
        self._lock = threading.Lock()  # the snapshot clock
        self._open_lock = threading.Lock()
        self._last_snapshot = time.monotonic()
        self._dirty = False
        self._max_bytes = config.max_shard_bytes
        self._write_problem: str | None = None  # the last write's failure; None once one succeeds
        self._unavailable: str | None = None
        self._adopt: Offsets | None = None  # committed offsets an upgraded store takes as applied
        self._store_seen = False  # the store was seen to exist (see has_store)
        if committed is not None:
            self._unavailable = self._committed_problem(committed)
            if self._unavailable:
                log.error("%s", self._unavailable)

    def warm_up(self) -> None:
        """Opens the backend (restoring its structure from snapshot + store) and records the
        store's identity when it is new. Idempotent. An unavailable shard stays closed (and says
        why in :meth:`health`); a store of another model raises :class:`ConfigError`."""
        with self._open_lock:
            if self._index is not None or self._unavailable is not None:
                return
            identity = read_identity(self.path)
            if identity is not None:
                self._unavailable = identity_problem(identity, self.index_name, self.shard, self.path)
                if self._unavailable:
                    log.error("%s", self._unavailable)
                    return
            self.path.mkdir(parents=True, exist_ok=True)
            index = self.backend.open(
                self.config, self.path, self.model, self.dim, index_name=self.index_name, shard=self.shard
            )
            if self._max_bytes != self.config.max_shard_bytes:  # set at run time since
                index.set_max_bytes(self._max_bytes)
            if identity is None or identity.store_id != index.store_id:  # a store created just now
                new = StoreIdentity.new(self.index_name, self.shard, self.model, self.dim, index.store_id)
                write_identity(self.path, new)
            if self._adopt is not None:
                index.apply(ShardWrite(offsets=self._adopt))
                self._adopt = None
            self._index = index

    def recorded_model(self) -> tuple[str, int] | None:
        """``(model, dim)`` of the shard's store, None when it has none yet."""
        if self._index is None and not self.has_store():
            return None
        return self.model, self.dim

    def has_store(self) -> bool:
        """Whether the shard's store exists (read without creating it). A store seen once is not
        read again: a shard never deletes its store, and reading one may be costly (Milvus Lite
        starts a server for it)."""
        if self._index is not None or self._store_seen:
            return True
        try:
            state = self.backend.stored_state(
                self.config, self.path, index_name=self.index_name, shard=self.shard
            )
        except StoreUnreadableError:
            return True  # it exists; opening it says what is wrong
        self._store_seen = state is not None
        return self._store_seen

    @property
    def index(self) -> ShardBackend:
        """The open backend; :class:`IndexUnavailableError` when the shard is unavailable or closed."""
        if self._unavailable is not None:
            raise IndexUnavailableError(self._unavailable)
        if self._index is None:
            raise IndexUnavailableError(f"shard {self.shard} ({self.path}) is not open")
        return self._index

    # -- writes ---------------------------------------------------------------------------

    def apply(self, write: ShardWrite) -> WriteResult:
        """Applies ``write`` (see :class:`ShardWrite`); durable on return. A failure that may pass
        (:class:`RetryableError`, e.g. :class:`StorageFullError`) is remembered for :meth:`health`
        until a write succeeds, and raised."""
        index = self.index
        try:
            result = index.apply(write)
        except RetryableError as exc:
            self._write_problem = str(exc)
            raise
        self._write_problem = None
        with self._lock:
            self._dirty = True
            due = time.monotonic() - self._last_snapshot >= self.config.snapshot_every_s
        if due:
            self._snapshot_quietly()
        return result

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Sets the store's quota in bytes at run time (None: no quota), e.g. once space is made.
        Kept for the next open too."""
        valid = isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes >= 1
        if max_bytes is not None and not valid:
            raise ValueError(f"shard {self.shard}: max_bytes must be an int >= 1 or None, got {max_bytes!r}")
        with self._open_lock:
            self._max_bytes = max_bytes
            if self._index is not None:
                self._index.set_max_bytes(max_bytes)

    # -- reads ----------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        return self.index.search(vectors, k, filter)

    def keyword_search(
        self, queries: Sequence[str], k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[list[Hit]]:
        return self.index.keyword_search(queries, k, filter, title_weight)

    def metadata_fields(self) -> set[str]:
        """Every metadata key some live chunk has: O(keys) with FAISS, O(chunks) with Milvus
        (it keeps no catalogue of JSON keys), so callers cache it."""
        return self.index.metadata_fields()

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

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        return self.index.get(chunk_ids)

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        return self.index.get_document_rows(document_ids)

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        """The stored version of each id that has one (see :class:`ShardWrite`)."""
        return self.index.get_document_versions(document_ids)

    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]:
        return self.index.scan_chunks(after, limit)

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        return self.index.scan_documents(after, limit)

    def offsets(self) -> Offsets:
        return self.index.offsets()

    def count(self) -> int:
        return self.index.count()

    def stats(self) -> dict[str, Any]:
        """``shard``, ``chunks`` (the store's live chunks), ``vectors`` (the vector structure's live
        vectors, counted by the structure itself), ``documents`` (document rows: the documents whose registry
        shard this is, so the sum over shards counts each live document once), ``offsets`` and
        ``path``. O(1); raises :class:`IndexUnavailableError` when the shard is unavailable."""
        index = self.index
        return {
            "shard": self.shard,
            "chunks": index.count(),
            "vectors": index.vector_count(),
            "documents": index.document_count(),
            "offsets": index.offsets(),
            "path": str(self.path),
        }

    def reader_source(self) -> dict[str, str] | None:
        """Where a read replica in another process finds this shard's store (FAISS: its
        directory and store id), or None when there is none to read: another backend, or the
        shard cannot serve (unavailable, closed), so its readers must stop too."""
        if self.config.backend != "faiss":
            return None
        try:
            index = self.index
        except IndexUnavailableError:
            return None
        return {"path": str(self.path), "store_id": index.store_id}

    def health(self) -> dict[str, Any]:
        """``{"shard", "status": "ok"|"degraded"|"unavailable", "problem", "chunks", "vectors"}``.
        ``degraded``: the last write failed (``problem`` says why, e.g. disk full); ``unavailable``:
        the shard cannot serve (its data is elsewhere, it is closed, or its structure cannot be
        rebuilt). Never raises; O(1)."""
        report: dict[str, Any] = {"shard": self.shard, "status": "ok", "problem": None, "chunks": None}
        report["vectors"] = None
        try:
            index = self.index
            report.update(chunks=index.count(), vectors=index.vector_count())
        except Exception as exc:  # health reports every failure, it never raises one
            return {**report, "status": "unavailable", "problem": str(exc) or type(exc).__name__}
        problem = self._write_problem
        return {**report, "status": "degraded" if problem else "ok", "problem": problem}

    # -- lifecycle ------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Snapshots the backend if a write came since the last one."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._last_snapshot = time.monotonic()
        try:
            self.index.snapshot()
        except BaseException:
            with self._lock:
                self._dirty = True  # still to do
            raise

    def close(self) -> None:
        """Snapshots (when a write came since) and closes the backend. Idempotent."""
        with self._open_lock:
            index, self._index = self._index, None
        if index is None:
            return
        try:
            if self._dirty:
                index.snapshot()
        except RetryableError as exc:  # the store has every write; a restart rebuilds or replays
            log.warning("shard %d: no snapshot at close: %s", self.shard, exc)
        finally:
            index.close()

    def _committed_problem(self, committed: Offsets) -> str | None:
        """Why this shard must not open its store given the group's ``committed`` offsets."""
        try:
            state = self.backend.stored_state(
                self.config, self.path, index_name=self.index_name, shard=self.shard
            )
        except StoreUnreadableError as exc:
            return f"shard {self.shard} ({self.path}): cannot read the store's offsets: {exc}"
        self._store_seen = self._store_seen or state is not None
        if state is not None and not state.complete:
            # What an older riverbed committed was durable on every shard; it just did not
            # always say so. The store adopts the committed offsets once it is open.
            log.warning(
                "shard %d (%s): a store from before schema 2 adopts the committed offsets %s",
                self.shard,
                self.path,
                committed,
            )
            self._adopt = committed
            return None
        applied = None if state is None else state.applied
        return committed_problem(self.index_name, self.shard, self.path, applied, committed)

    def check_committed(self, committed: Offsets) -> None:
        """Runs the committed-offsets check late (it could not run at construction); an
        unavailable verdict then closes the shard."""
        problem = self._committed_problem(committed)
        if problem is not None:
            log.error("%s", problem)
            self.close()
            self._unavailable = problem

    def _snapshot_quietly(self) -> None:
        """A snapshot after a write: its failure does not fail the write, which is durable."""
        try:
            self.snapshot()
        except RetryableError as exc:
            log.warning("shard %d: snapshot failed (retried after the next write): %s", self.shard, exc)
