"""The write path of a :class:`~actors.shard_store.ShardStore`: one :class:`ShardWrite` as SQL
statements inside the store's transaction, and the failures of SQLite sorted by what the caller
does about them.

Versioning: for each document in ``write.versions`` whose change is older than the version the
store holds (:func:`schemas.topology.is_older`), every part of the write for that document is
skipped (its chunks' upserts, its truncation, its deletion, the chunk deletions of its ids, its
document row) and counted in ``WriteResult.stale``; otherwise the parts apply and the version is
recorded, for deletes too. A chunk row carries the version of the record that wrote it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from actors.vector_index import ChunkRecord, DocumentRow, ShardWrite, WriteResult
from schemas.errors import ProcessingError, RetryableError, StorageFullError
from schemas.ids import split_chunk_id
from schemas.topology import Version, is_older

BATCH = 500  # ids per "IN (...)" query, well under SQLite's bound-parameter limit
# A record's stored columns, in ChunkRecord's field order: its content, then its alignment (a
# column since schema 3).
CONTENT = "document_id, number, text, title, span_start, span_end, metadata, vector"
COLUMNS = f"{CONTENT}, alignment"
SOURCE = "source_topic, source_partition, source_offset"
# The bookkeeping statements (document rows, versions, offsets), shared with the graph store,
# whose tables of them are the same (store_schema.BOOKKEEPING).
UPSERT_DOCUMENT = (
    "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (document_id) DO UPDATE SET"
    " content_hash = excluded.content_hash, n_chunks = excluded.n_chunks,"
    " updated_seq = excluded.updated_seq, source_topic = excluded.source_topic,"
    " source_partition = excluded.source_partition, source_offset = excluded.source_offset"
    " WHERE content_hash != excluded.content_hash OR n_chunks != excluded.n_chunks"
    " OR source_topic IS NOT excluded.source_topic OR source_partition IS NOT excluded.source_partition"
    " OR source_offset IS NOT excluded.source_offset"
)
RECORD_VERSION = (
    "INSERT INTO doc_versions VALUES (?, ?, ?, ?) ON CONFLICT (document_id) DO UPDATE SET"
    " topic = excluded.topic, partition = excluded.partition, offset = excluded.offset"
    " WHERE topic != excluded.topic OR partition != excluded.partition OR offset != excluded.offset"
)
MERGE_OFFSET = (
    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE"
    " SET next_offset = max(next_offset, excluded.next_offset)"
)
_SET_SOURCE = "UPDATE chunks SET source_topic = ?, source_partition = ?, source_offset = ? WHERE id = ?"
# Errors SQLite raises for the data of a write: retried, it fails the same way.
_DATA_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    UnicodeError,
    OverflowError,
)
_NO_SOURCE = (None, None, None)


@dataclass(frozen=True)
class StoreChanges:
    """How one write changed the live rows, for the in-memory structure to mirror."""

    result: WriteResult
    seq: int  # the store's last seq after the write
    added_ids: np.ndarray  # int64
    added_vectors: np.ndarray  # (len(added_ids), dim) float32
    removed_ids: np.ndarray  # int64


def apply_write(
    cur: sqlite3.Cursor,
    seq: int,
    write: ShardWrite,
    records: Sequence[ChunkRecord],
    matrix: np.ndarray,
    where: str,
) -> tuple[StoreChanges, bool]:
    """Runs ``write`` (its upserts deduplicated as ``records``, their vectors ``matrix``) as the
    write numbered ``seq``, in :class:`ShardWrite`'s order, inside the caller's transaction.
    Returns the changes and whether a chunk or document row changed (the caller then records
    ``seq``; the returned changes carry it either way). ``where`` names the shard in errors."""
    stored = read_versions(cur, list(write.versions))
    stale = {d for d, v in write.versions.items() if is_older(v, stored.get(d))}
    step = _Write(cur, seq, write.versions, stale, where)
    step.truncate(write.truncate)
    step.delete_documents(write.delete_documents)
    step.delete_chunks(write.delete_chunks)
    step.upsert(records, matrix)
    step.set_documents(write.documents)
    step.record_versions()
    step.merge_offsets(write.offsets)
    return step.changes(matrix), step.changed


def read_versions(cur: sqlite3.Cursor, document_ids: list[str]) -> dict[str, Version]:
    """The stored version of each id that has one."""
    found: dict[str, Version] = {}
    for batch in batches(document_ids):
        sql = (
            "SELECT document_id, topic, partition, offset FROM doc_versions"
            f" WHERE document_id IN ({marks(len(batch))})"
        )
        for d, topic, partition, offset in cur.execute(sql, batch):
            found[d] = (topic, partition, offset)
    return found


def read_document_rows(cur: sqlite3.Cursor, document_ids: list[str]) -> dict[str, DocumentRow]:
    """The registry row of each id that has one."""
    rows: dict[str, DocumentRow] = {}
    for batch in batches(list(dict.fromkeys(document_ids))):
        sql = (
            f"SELECT document_id, content_hash, n_chunks, {SOURCE}"
            f" FROM documents WHERE document_id IN ({marks(len(batch))})"
        )
        for d, h, n, topic, partition, offset in cur.execute(sql, batch):
            rows[d] = DocumentRow(h, n, (topic, partition, offset) if topic is not None else None)
    return rows


def classify(exc: BaseException, where: str, max_bytes: int | None) -> BaseException:
    """``exc``, raised by a store write at ``where``, as the error kind its caller acts on:
    :class:`StorageFullError` (no space: the disk, or the quota ``max_bytes``), :class:`ProcessingError`
    (the data can never be stored or read back), :class:`RetryableError` (SQLite cannot write now:
    locked, I/O error). Anything else is returned as it is."""
    if isinstance(exc, sqlite3.OperationalError):
        if _is_full(exc):
            quota = f" (quota: {max_bytes} bytes)" if max_bytes is not None else ""
            return StorageFullError(f"{where}: disk full: {exc}{quota}")
        if "could not decode" in str(exc).lower():
            return ProcessingError(f"{where}: stored data cannot be read: {exc}")
        return RetryableError(f"{where}: write failed: {exc}")
    if _is_data_error(exc):
        return ProcessingError(f"{where}: this write cannot be stored: {type(exc).__name__}: {exc}")
    return exc


class _Stored(NamedTuple):
    """A stored chunk as the write path compares it: row id, the record that wrote it, content."""

    id: int
    source: tuple[Any, ...]
    row: tuple[Any, ...]


class _Write:
    """The steps of one write and what they changed. The parts of ``stale`` documents are
    skipped. Each statement about one chunk or document runs on its own, so a value SQLite
    refuses raises :class:`ProcessingError` naming it."""

    def __init__(
        self, cur: sqlite3.Cursor, seq: int, versions: Mapping[str, Version], stale: set[str], where: str
    ) -> None:
        self.cur, self.seq, self.versions, self.stale, self.where = cur, seq, versions, stale, where
        self.deleted: list[int] = []  # by truncate, delete_documents, delete_chunks
        self.replaced: list[int] = []  # old ids of changed chunks
        self.added: list[tuple[int, int]] = []  # (new id, position in the records)
        self.applied_records = 0
        self.document_changes = 0

    @property
    def changed(self) -> bool:
        """Whether a chunk or document row changed (the write then takes ``seq``)."""
        return bool(self.deleted or self.replaced or self.added or self.document_changes)

    def truncate(self, truncate: Mapping[str, int]) -> None:
        for document_id, keep in truncate.items():
            if document_id not in self.stale:
                with self._about(f"document {document_id!r}"):
                    self.deleted += self._delete("document_id = ? AND number >= ?", [document_id, keep])

    def delete_documents(self, document_ids: Sequence[str]) -> None:
        for document_id in document_ids:
            if document_id not in self.stale:
                with self._about(f"document {document_id!r}"):
                    self.deleted += self._delete("document_id = ?", [document_id])
                    self.cur.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
                    self.document_changes += max(self.cur.rowcount, 0)

    def delete_chunks(self, chunk_ids: Sequence[str]) -> None:
        live = [c for c in chunk_ids if _document_of(c) not in self.stale]
        for batch in batches(live):
            with self._about(f"one of the chunks {batch[0]!r}..{batch[-1]!r}"):
                self.deleted += self._delete(f"chunk_id IN ({marks(len(batch))})", batch)

    def upsert(self, records: Sequence[ChunkRecord], matrix: np.ndarray) -> None:
        """Inserts new and changed chunks; an identical one is skipped, or, re-delivered by another
        record, only its source columns are updated (same row id: nothing for FAISS to do)."""
        live = [(i, r) for i, r in enumerate(records) if r.document_id not in self.stale]
        self.applied_records = len(live)
        if not live:
            return
        with self._about(f"one of the chunks {live[0][1].chunk_id!r}..{live[-1][1].chunk_id!r}"):
            existing = self._existing([r.chunk_id for _, r in live])
        for i, record in live:
            version = self.versions.get(record.document_id)
            with self._about(f"chunk {record.chunk_id!r}"):
                self._upsert(i, record, _row(record, matrix[i]), version, existing.get(record.chunk_id))

    def set_documents(self, documents: Mapping[str, DocumentRow]) -> None:
        for document_id, row in documents.items():
            if document_id not in self.stale:
                values = (document_id, row.content_hash, row.n_chunks, self.seq, *(row.source or _NO_SOURCE))
                with self._about(f"document {document_id!r}"):
                    self.cur.execute(UPSERT_DOCUMENT, values)
                    self.document_changes += max(self.cur.rowcount, 0)

    def record_versions(self) -> None:
        """Stores the version of every versioned document whose change applied (deletes too)."""
        for document_id, version in self.versions.items():
            if document_id not in self.stale:
                with self._about(f"document {document_id!r}"):
                    self.cur.execute(RECORD_VERSION, (document_id, *version))

    def merge_offsets(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        for topic, positions in offsets.items():
            with self._about(f"the offsets of topic {topic!r}"):
                self.cur.executemany(MERGE_OFFSET, [(topic, int(p), int(o)) for p, o in positions.items()])

    def changes(self, matrix: np.ndarray) -> StoreChanges:
        positions = [i for _, i in self.added]
        return StoreChanges(
            result=WriteResult(
                upserted=len(self.added),
                unchanged=self.applied_records - len(self.added),
                deleted=len(self.deleted),
                stale=len(self.stale),
            ),
            seq=self.seq,
            added_ids=np.array([a for a, _ in self.added], dtype=np.int64),
            added_vectors=matrix[positions] if positions else np.zeros((0, matrix.shape[1]), np.float32),
            removed_ids=np.array(self.deleted + self.replaced, dtype=np.int64),
        )

    def _upsert(
        self, i: int, record: ChunkRecord, row: tuple[Any, ...], version: Version | None, old: _Stored | None
    ) -> None:
        if old is not None and old.row == row:
            if version is not None and old.source != tuple(version):
                self.cur.execute(_SET_SOURCE, (*version, old.id))
            return
        if old is not None:
            self.replaced += self._delete("id = ?", [old.id])
        self.cur.execute(
            f"INSERT INTO chunks (chunk_id, {COLUMNS}, seq, {SOURCE}) VALUES ({marks(14)})",
            (record.chunk_id, *row, self.seq, *(version or _NO_SOURCE)),
        )
        self.added.append((int(self.cur.lastrowid or 0), i))

    def _delete(self, where: str, params: Sequence[object]) -> list[int]:
        ids = [r[0] for r in self.cur.execute(f"SELECT id FROM chunks WHERE {where}", params)]
        if ids:
            self.cur.execute(f"DELETE FROM chunks WHERE {where}", params)
            self.cur.executemany("INSERT INTO tombstones VALUES (?, ?)", [(i, self.seq) for i in ids])
        return ids

    def _existing(self, chunk_ids: list[str]) -> dict[str, _Stored]:
        found: dict[str, _Stored] = {}
        for batch in batches(chunk_ids):
            sql = (
                f"SELECT chunk_id, id, {SOURCE}, {COLUMNS} FROM chunks"
                f" WHERE chunk_id IN ({marks(len(batch))})"
            )
            for r in self.cur.execute(sql, batch):
                found[r[0]] = _Stored(r[1], tuple(r[2:5]), tuple(r[5:]))
        return found

    def _about(self, what: str) -> AbstractContextManager[None]:
        return _about(f"{self.where}: {what}")


@contextmanager
def _about(what: str) -> Iterator[None]:
    """Turns an error SQLite raises for the data of ``what`` into a :class:`ProcessingError` naming
    it (the same data fails the same way on every retry). The store's own trouble passes."""
    try:
        yield
    except Exception as exc:
        if _is_data_error(exc):
            raise ProcessingError(f"{what} cannot be stored: {type(exc).__name__}: {exc}") from exc
        raise


def _row(record: ChunkRecord, vector: np.ndarray) -> tuple[Any, ...]:
    """The stored columns of a record, as SQLite returns them (for the equality check)."""
    metadata = json.dumps(record.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (record.document_id, record.number, record.text, record.title, record.start,
            record.end, metadata, vector.astype("<f4").tobytes(), record.alignment)  # fmt: skip


def _document_of(chunk_id: str) -> str | None:
    try:
        return split_chunk_id(chunk_id)[0]
    except ValueError:
        return None


def _is_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(exc)


def _is_data_error(exc: BaseException) -> bool:
    """SQLite refused a value: a constraint, an unbindable type or string, an integer too big."""
    binding = isinstance(exc, sqlite3.ProgrammingError) and "binding" in str(exc).lower()
    return binding or isinstance(exc, _DATA_ERRORS)


def marks(n: int) -> str:
    """``?, ?, ...``: ``n`` parameter marks."""
    return ", ".join("?" * n)


def batches(items: list[Any]) -> Iterator[list[Any]]:
    """``items`` in slices of at most :data:`BATCH` (one ``IN (...)`` query each)."""
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]
