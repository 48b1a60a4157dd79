"""The durable half of an index shard: one SQLite file per shard directory.

The store is the source of truth (DESIGN.md, "Durability and delivery"): a write is durable once
:meth:`ShardStore.apply` returns (one transaction, WAL, ``synchronous=FULL``), and the in-memory
FAISS structure is derived from it and can always be rebuilt from it.

Every chunk row's integer ``id`` is its FAISS id. Ids are ``AUTOINCREMENT``: never reused, and a
row is never modified in place (a changed chunk gets a new row and id, the old id a tombstone).
So an id always names the same vector, which lets HNSW mask deleted ids. Every write that changes
something gets the next ``seq``; as ids only grow, the rows of writes after ``seq`` are exactly the
ids from some point on, so a snapshot taken at ``seq`` catches up cheaply with
:meth:`ShardStore.iter_vectors` and :meth:`ShardStore.removed_since` (tombstones).

Thread safety: one connection behind a lock, so every method may be called from any thread.
One writer process per store, enforced by an exclusive ``flock`` on ``<dir>/LOCK``; other
processes (``riverbed stats``) open it with :meth:`ShardStore.read_only` and see committed data.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from actors.vector_index import ChunkRecord, DocumentRow, Hit, ShardWrite, WriteResult, check_records
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError
from schemas.filters import MetadataFilter

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite3"
_BATCH = 500  # ids per "IN (...)" query, well under SQLite's bound-parameter limit
_COLUMNS = "document_id, number, text, title, span_start, span_end, metadata, vector"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    chunk_id TEXT NOT NULL UNIQUE, document_id TEXT NOT NULL, number INTEGER NOT NULL,
    text TEXT NOT NULL, title TEXT, span_start INTEGER NOT NULL, span_end INTEGER NOT NULL,
    metadata TEXT NOT NULL,  -- JSON object, canonical (sorted keys)
    vector BLOB NOT NULL,    -- little-endian float32 x dim
    seq INTEGER NOT NULL     -- the write that inserted the row
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks (document_id, number);
CREATE INDEX IF NOT EXISTS chunks_seq ON chunks (seq);
-- covering index: a filter scans metadata without reading the text and vector of every row
CREATE INDEX IF NOT EXISTS chunks_metadata ON chunks (metadata);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones (seq);
CREATE TABLE IF NOT EXISTS documents (document_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, updated_seq INTEGER NOT NULL,
    source_topic TEXT, source_partition INTEGER, source_offset INTEGER);
-- BM25 keyword index over chunk text and title, kept in step with `chunks` by triggers (rows are
-- only ever inserted and deleted, never updated); porter stemming, diacritics folded
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, title, content='chunks',
    content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title) VALUES (new.id, new.text, new.title);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title) VALUES ('delete', old.id, old.text, old.title);
END;
CREATE TABLE IF NOT EXISTS offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition));
"""
_UPSERT_DOCUMENT = (
    "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (document_id) DO UPDATE SET"
    " content_hash = excluded.content_hash, n_chunks = excluded.n_chunks,"
    " updated_seq = excluded.updated_seq, source_topic = excluded.source_topic,"
    " source_partition = excluded.source_partition, source_offset = excluded.source_offset"
    " WHERE content_hash != excluded.content_hash OR n_chunks != excluded.n_chunks"
)
_FTS_TERM = re.compile(r"\w+", re.UNICODE)
_MERGE_OFFSET = (
    "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition) DO UPDATE"
    " SET next_offset = max(next_offset, excluded.next_offset)"
)


@dataclass(frozen=True)
class StoreChanges:
    """How one write changed the live rows, for the in-memory structure to mirror."""

    result: WriteResult
    seq: int  # the store's last seq after the write
    added_ids: np.ndarray  # int64
    added_vectors: np.ndarray  # (len(added_ids), dim) float32
    removed_ids: np.ndarray  # int64


class ShardStore:
    """SQLite store of one shard directory, for one embedding ``model`` and ``dim``.

    Opening a store written for another model or dim raises :class:`ConfigError` naming both.
    """

    def __init__(self, directory: Path, model: str, dim: int, *, _read_only: bool = False) -> None:
        self.directory = directory
        self._lock = threading.RLock()
        self._lock_file: IO[str] | None = None
        try:
            if _read_only:
                uri = f"file:{directory / DB_NAME}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                self._lock_file = _lock_directory(directory)
                self._conn = sqlite3.connect(
                    directory / DB_NAME, isolation_level=None, check_same_thread=False
                )
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = FULL")
                self._conn.execute("PRAGMA busy_timeout = 10000")
                _migrate(self._conn)
                self._conn.executescript(_SCHEMA)
            self._conn.execute("PRAGMA busy_timeout = 10000")
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            if not _read_only and meta and "keyword_index" not in meta:
                # a store from before the keyword index: index the chunks it already holds
                with self._transaction() as cur:
                    cur.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")
                    cur.execute("INSERT INTO meta VALUES ('keyword_index', 'fts5')")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise IndexUnavailableError(f"shard {directory}: cannot open the store: {exc}") from exc
        if not meta and not _read_only:
            meta = {
                "model": model,
                "dim": str(dim),
                "schema_version": str(SCHEMA_VERSION),
                "seq": "0",
                "keyword_index": "fts5",
            }
            with self._transaction() as cur:
                cur.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        if _read_only:
            model, dim = meta.get("model", model), int(meta.get("dim", dim))
        if meta.get("model") != model or meta.get("dim") != str(dim):
            self.close()
            raise ConfigError(
                f"shard {directory} holds model {meta.get('model')!r} (dim {meta.get('dim')}), "
                f"not model {model!r} (dim {dim}): a new model means a new index"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            self.close()
            raise ConfigError(
                f"shard {directory} has store schema {meta.get('schema_version')}, this riverbed "
                f"reads {SCHEMA_VERSION}"
            )
        self.model, self.dim = model, dim
        self._seq = int(meta["seq"])

    @classmethod
    def read_only(cls, directory: Path) -> ShardStore:
        """Opens an existing store for reading, whatever its model; no lock, writes refused."""
        return cls(directory, "", 0, _read_only=True)

    @property
    def seq(self) -> int:
        """The number of the last write that changed a chunk or document row (0: none yet)."""
        return self._seq

    def apply(self, write: ShardWrite) -> StoreChanges:
        """Applies ``write`` in one transaction, in :class:`ShardWrite`'s order; durable on return.

        Raises ``ValueError`` for a bad vector (nothing written), :class:`RetryableError` if
        SQLite cannot write now (locked, I/O error; nothing written).
        """
        records = write.unique_upserts()
        matrix = check_records(records, self.dim, f"shard {self.directory}")
        seq = self._seq + 1
        deleted: list[int] = []  # by truncate, delete_documents, delete_chunks
        replaced: list[int] = []  # old ids of changed chunks
        added: list[tuple[int, int]] = []  # (new id, position in records)
        with self._lock, self._transaction() as cur:
            for document_id, keep in write.truncate.items():
                deleted += self._delete(cur, "document_id = ? AND number >= ?", [document_id, keep], seq)
            for document_id in write.delete_documents:
                deleted += self._delete(cur, "document_id = ?", [document_id], seq)
            doc_rows = [(d,) for d in write.delete_documents]
            doc_changes = _rowcount(cur.executemany("DELETE FROM documents WHERE document_id = ?", doc_rows))
            for batch in _batches(list(write.delete_chunks)):
                deleted += self._delete(cur, f"chunk_id IN ({_marks(len(batch))})", batch, seq)
            existing = self._existing(cur, [r.chunk_id for r in records])
            for i, record in enumerate(records):
                row = _row(record, matrix[i])
                old = existing.get(record.chunk_id)
                if old is not None and old[1:] == row:
                    continue  # identical re-delivery: no new id, no new seq
                if old is not None:
                    replaced += self._delete(cur, "id = ?", [old[0]], seq)
                cur.execute(
                    f"INSERT INTO chunks (chunk_id, {_COLUMNS}, seq) VALUES ({_marks(10)})",
                    (record.chunk_id, *row, seq),
                )
                added.append((int(cur.lastrowid or 0), i))
            doc_changes += _rowcount(cur.executemany(_UPSERT_DOCUMENT, [
                (d, row.content_hash, row.n_chunks, seq, *(row.source or (None, None, None)))
                for d, row in write.documents.items()
            ]))  # fmt: skip
            cur.executemany(_MERGE_OFFSET, [
                (t, int(p), int(o)) for t, ps in write.offsets.items() for p, o in ps.items()
            ])  # fmt: skip
            changed = bool(deleted or replaced or added or doc_changes)
            if changed:
                cur.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
        if changed:
            self._seq = seq
        positions = [i for _, i in added]
        return StoreChanges(
            result=WriteResult(
                upserted=len(added), unchanged=len(records) - len(added), deleted=len(deleted)
            ),
            seq=self._seq,
            added_ids=np.array([a for a, _ in added], dtype=np.int64),
            added_vectors=matrix[positions] if positions else np.zeros((0, self.dim), np.float32),
            removed_ids=np.array(deleted + replaced, dtype=np.int64),
        )

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        found: dict[str, ChunkRecord] = {}
        with self._lock:
            for batch in _batches(list(chunk_ids)):
                sql = f"SELECT chunk_id, {_COLUMNS} FROM chunks WHERE chunk_id IN ({_marks(len(batch))})"
                for cid, doc, n, text, title, start, end, meta, vec in self._conn.execute(sql, batch):
                    vector = np.frombuffer(vec, "<f4").astype(np.float32)
                    found[cid] = ChunkRecord(cid, doc, n, text, title, start, end, json.loads(meta), vector)
        return [found.get(c) for c in chunk_ids]

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
        """One list of hits per row of the ``(n, k)`` id and score arrays, in their order.
        Negative ids (FAISS padding) and ids no longer stored are skipped."""
        rows: dict[int, tuple[Any, ...]] = {}
        wanted = [int(i) for i in np.unique(ids) if i >= 0]
        with self._lock:
            for batch in _batches(wanted):
                sql = (
                    "SELECT id, chunk_id, document_id, number, text, title, span_start, span_end,"
                    f" metadata FROM chunks WHERE id IN ({_marks(len(batch))})"
                )
                rows.update((r[0], r[1:]) for r in self._conn.execute(sql, batch))
        result: list[list[Hit]] = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist(), strict=True):
            hits: list[Hit] = []
            for i, score in zip(row_ids, row_scores, strict=True):
                if (row := rows.get(i)) is not None:
                    cid, doc, number, text, title, start, end, meta = row
                    hits.append(Hit(cid, doc, number, text, title, start, end, json.loads(meta), score))
            result.append(hits)
        return result

    def filter_ids(self, filter: MetadataFilter) -> np.ndarray:
        """The ids of live chunks whose metadata satisfies ``filter``, ascending (int64)."""
        where, params = filter.to_sql("metadata")
        with self._lock:
            rows = self._conn.execute(f"SELECT id FROM chunks WHERE {where}", params)
            return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64))

    def iter_vectors(
        self, after_seq: int = 0, batch: int = 50_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` of live rows written after ``after_seq`` (all: 0), by ascending id."""
        with self._lock:  # ids grow with seq: the rows after after_seq are those from its first id on
            first = self._conn.execute(
                "SELECT id FROM chunks WHERE seq > ? ORDER BY seq, id LIMIT 1", (after_seq,)
            ).fetchone()
        last = first[0] - 1 if first else None
        while last is not None:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT id, vector FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([r[0] for r in rows], dtype=np.int64), _matrix([r[1] for r in rows], self.dim)

    def removed_since(self, seq: int) -> np.ndarray:
        """Ids deleted by writes after ``seq``. Raises ``ValueError`` when tombstones after ``seq``
        were already pruned (by a snapshot newer than ``seq``)."""
        with self._lock:
            pruned = self._conn.execute("SELECT value FROM meta WHERE key = 'pruned_seq'").fetchone()
            if pruned is not None and seq < int(pruned[0]):
                raise ValueError(f"deletions up to seq {pruned[0]} are forgotten, asked since {seq}")
            rows = self._conn.execute("SELECT id FROM tombstones WHERE seq > ?", (seq,))
            return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def prune_tombstones(self, up_to_seq: int) -> None:
        """Forgets deletions at or before ``up_to_seq`` (a snapshot at that seq no longer needs them)."""
        with self._lock, self._transaction() as cur:
            cur.execute("DELETE FROM tombstones WHERE seq <= ?", (up_to_seq,))
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_seq', ?)", (str(up_to_seq),))

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def document_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT DISTINCT document_id FROM chunks")}

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(document_ids, 0)
        with self._lock:
            for batch in _batches(list(counts)):
                marks = _marks(len(batch))
                sql = f"SELECT document_id, count(*) FROM chunks WHERE document_id IN ({marks}) GROUP BY 1"
                counts.update(self._conn.execute(sql, batch).fetchall())
        return counts

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        rows: dict[str, DocumentRow] = {}
        with self._lock:
            for batch in _batches(list(dict.fromkeys(document_ids))):
                sql = (
                    "SELECT document_id, content_hash, n_chunks, source_topic, source_partition,"
                    f" source_offset FROM documents WHERE document_id IN ({_marks(len(batch))})"
                )
                for d, h, n, topic, partition, offset in self._conn.execute(sql, batch):
                    source = (topic, partition, offset) if topic is not None else None
                    rows[d] = DocumentRow(h, n, source)
        return rows

    def keyword_search(
        self, query: str, k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[Hit]:
        """Top ``k`` chunks by BM25 (SQLite FTS5's ``bm25()``) for the words of ``query``, any of
        which may match (OR), best first; ``score`` is the BM25 score (higher is better).

        Words are runs of letters and digits, stemmed and case- and accent-folded like the indexed
        text, so no query string is ever parsed as FTS5 syntax. No word: no hits. BM25's
        statistics (document count, average length, term frequencies) are this shard's.
        """
        terms = fts_terms(query)
        if not terms or k < 1:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        where, params = (filter or MetadataFilter()).to_sql("c.metadata")
        sql = (
            "SELECT c.chunk_id, c.document_id, c.number, c.text, c.title, c.span_start, c.span_end,"
            " c.metadata, -bm25(chunks_fts, 1.0, ?) AS score"
            " FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid"
            f" WHERE chunks_fts MATCH ? AND {where} ORDER BY score DESC, c.id LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, [float(title_weight), match, *params, int(k)]).fetchall()
        return [
            Hit(cid, doc, number, text, title, start, end, json.loads(meta), float(score))
            for cid, doc, number, text, title, start, end, meta, score in rows
        ]

    def metadata_fields(self) -> set[str]:
        """Every metadata key some live chunk has (filters on any other key match nothing)."""
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT j.key FROM chunks, json_each(chunks.metadata) AS j")
            return {r[0] for r in rows}

    def offsets(self) -> dict[str, dict[int, int]]:
        result: dict[str, dict[int, int]] = {}
        with self._lock:
            for topic, partition, offset in self._conn.execute("SELECT * FROM offsets"):
                result.setdefault(topic, {})[partition] = offset
        return result

    def close(self) -> None:
        """Closes the connection and releases the writer lock. Idempotent."""
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
                del self._conn
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None

    # -- internals ------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        if self._lock_file is None:
            raise ConfigError(f"shard {self.directory}: opened read-only, cannot write")
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise RetryableError(f"shard {self.directory}: write failed: {exc}") from exc
            raise

    def _delete(self, cur: sqlite3.Cursor, where: str, params: Sequence[object], seq: int) -> list[int]:
        ids = [r[0] for r in cur.execute(f"SELECT id FROM chunks WHERE {where}", params)]
        if ids:
            cur.execute(f"DELETE FROM chunks WHERE {where}", params)
            cur.executemany("INSERT INTO tombstones VALUES (?, ?)", [(i, seq) for i in ids])
        return ids

    def _existing(self, cur: sqlite3.Cursor, chunk_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        for batch in _batches(chunk_ids):
            sql = f"SELECT chunk_id, id, {_COLUMNS} FROM chunks WHERE chunk_id IN ({_marks(len(batch))})"
            found.update((r[0], tuple(r[1:])) for r in cur.execute(sql, batch))
        return found


def fts_terms(query: str, limit: int = 64) -> list[str]:
    """The distinct words of ``query`` (lowercased, in order, at most ``limit``): what keyword
    search looks up. Each is quoted as an FTS5 string, so none is read as an operator."""
    return list(dict.fromkeys(w.lower() for w in _FTS_TERM.findall(query)))[:limit]


def _migrate(conn: sqlite3.Connection) -> None:
    """Brings a store written by an older riverbed up to the current tables (additive only)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(documents)")}
    if columns and "source_topic" not in columns:
        for column, kind in (("source_topic", "TEXT"), ("source_partition", "INTEGER"),
                             ("source_offset", "INTEGER")):  # fmt: skip
            conn.execute(f"ALTER TABLE documents ADD COLUMN {column} {kind}")


def _row(record: ChunkRecord, vector: np.ndarray) -> tuple[Any, ...]:
    """The stored columns of a record, as SQLite returns them (for the equality check)."""
    metadata = json.dumps(record.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (record.document_id, record.number, record.text, record.title, record.start,
            record.end, metadata, vector.astype("<f4").tobytes())  # fmt: skip


def _matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), dim).astype(np.float32)


def _lock_directory(directory: Path) -> IO[str]:
    handle = open(directory / "LOCK", "a+")  # noqa: SIM115  # held open until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RetryableError(
            f"shard {directory} is open by another writer (pid {holder}); retry once it has closed"
        ) from exc
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _rowcount(cur: sqlite3.Cursor) -> int:
    return max(cur.rowcount, 0)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]
