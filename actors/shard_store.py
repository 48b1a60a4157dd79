"""The durable half of an index shard: one SQLite file per shard directory.

The store is the source of truth: a write is durable once :meth:`ShardStore.apply` returns (one
transaction, WAL, ``synchronous=FULL``), and the in-memory FAISS structure is derived from it and
can always be rebuilt from it. A write that fails changes nothing.

Every chunk row's integer ``id`` is its FAISS id. Ids are ``AUTOINCREMENT``: never reused, and a
row's content is never modified in place (a changed chunk gets a new row and id, the old id a
tombstone; only the columns naming the record that wrote it are updated). So an id always names
the same vector, which lets HNSW mask deleted ids. Every write that changes a chunk or document
row gets the next ``seq``; as ids only grow, the rows of writes after ``seq`` are exactly the ids
from some point on, so a snapshot taken at ``seq`` catches up cheaply with
:meth:`ShardStore.iter_vectors` and :meth:`ShardStore.removed_since` (tombstones).

Writes are versioned per document (see :class:`~actors.vector_index.ShardWrite`): a change older
than the version the store holds for its document is skipped, so a late or re-delivered record
never overwrites a newer one.

Failures, by what the caller does: :class:`StorageFullError` (the disk or the quota is full;
retry once there is space), :class:`RetryableError` (locked, I/O error), :class:`ProcessingError`
(this write's data can never be stored: a constraint, a value SQLite cannot bind; the message
names the chunk or document), ``ValueError`` for a bad vector.

Tables, counters and upgrades of older stores: :mod:`actors.store_schema`.

Thread safety: one connection behind a lock, so every method may be called from any thread.
One writer process per store, enforced by an exclusive ``flock`` on ``<dir>/LOCK``; other
processes (``riverbed stats``) open it with :meth:`ShardStore.read_only` and see committed data.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from actors import store_schema
from actors.sqlite_store import SQLiteStore
from actors.store_schema import SCHEMA_VERSION
from actors.store_write import (
    CONTENT,
    StoreChanges,
    apply_write,
    batches,
    marks,
    read_document_rows,
    read_versions,
)
from actors.vector_index import ChunkRecord, DocumentEntry, DocumentRow, Hit, ShardWrite, check_records
from schemas.errors import IndexUnavailableError
from schemas.filters import MetadataFilter
from schemas.topology import Version

__all__ = ["DB_NAME", "SCHEMA_VERSION", "ShardStore", "StoreChanges", "fts_terms"]

DB_NAME = "store.sqlite3"
_FTS_TERM = re.compile(r"\w+", re.UNICODE)


class ShardStore(SQLiteStore):
    """SQLite store of one shard directory, for one embedding ``model`` and ``dim``.

    Opening creates the store, or upgrades one of an older schema in place. Raises
    :class:`ConfigError` when it was written for another model or dim (naming both), and
    :class:`IndexUnavailableError` when the file is not a usable database. ``max_bytes`` is the
    quota (see :meth:`set_max_bytes`).
    """

    def __init__(
        self, directory: Path, model: str, dim: int, *, max_bytes: int | None = None, _read_only: bool = False
    ) -> None:
        super().__init__(f"shard {directory}")
        self.directory = directory
        self._default_max_pages = 0
        with self._opening():
            meta = self._open_read_only() if _read_only else self._open_for_write(model, dim)
        self.model, self.dim = meta["model"], int(meta["dim"])
        self.store_id = meta.get("store_id", "")
        self._schema = store_schema.schema_version(meta)
        # A read-only store from before schema 3 has no alignments: every chunk's is not known.
        self._alignment = "alignment" if self._schema >= 3 else "NULL"
        self._columns = f"{CONTENT}, {self._alignment}"
        self._seq = int(meta["seq"])
        if max_bytes is not None:
            self.set_max_bytes(max_bytes)

    @classmethod
    def read_only(cls, directory: Path) -> ShardStore:
        """Opens an existing store for reading, whatever its model; no lock, writes refused. A store
        of an older schema is read as it is (its figures are counted by scanning)."""
        return cls(directory, "", 0, _read_only=True)

    @property
    def seq(self) -> int:
        """The number of the last write that changed a chunk or document row (0: none yet). A
        read-only store knows the seq it last read: :meth:`current_seq` reads it again."""
        return self._seq

    def current_seq(self) -> int:
        """The seq as committed now (another process may be writing); remembered as :attr:`seq`."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
            self._seq = int(row[0]) if row else 0
            return self._seq

    @contextmanager
    def read_view(self) -> Iterator[None]:
        """One read transaction: every read inside sees the store as of one commit (WAL), however
        many writes another process commits meanwhile, so a reader can take the seq, the rows and
        the tombstones together. Holds this store's lock throughout."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------

    def apply(self, write: ShardWrite) -> StoreChanges:
        """Applies ``write`` in one transaction, in :class:`ShardWrite`'s order, skipping the parts
        of documents whose version is older than the stored one; durable on return.

        Raises ``ValueError`` for a bad vector, :class:`ProcessingError` naming the chunk or
        document whose data SQLite refuses, :class:`StorageFullError` when the store is full and
        :class:`RetryableError` if SQLite cannot write now (locked, I/O error). Nothing is written
        when it raises.
        """
        records = write.unique_upserts()
        matrix = check_records(records, self.dim, self._where)
        with self._lock, self._transaction() as cur:
            changes, changed = apply_write(cur, self._seq + 1, write, records, matrix, self._where)
            if changed:
                cur.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(changes.seq),))
        if changed:
            self._seq = changes.seq
        return changes if changed else replace(changes, seq=self._seq)

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Sets the quota: the database file may hold at most ``max_bytes`` (whole pages; None:
        SQLite's own limit). A write that needs more raises :class:`StorageFullError` and writes
        nothing. The quota never shrinks the file: set below its size, it refuses every write that
        needs a new page (deletes mostly free pages, so they usually pass). Per connection, not
        stored: pass it again on every open."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"{self._where}: max_bytes must be a positive int or None, got {max_bytes!r}")
        with self._lock:
            if max_bytes is None:
                pages = self._default_max_pages
            else:
                page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
                pages = max(1, max_bytes // page_size)
            self._conn.execute(f"PRAGMA max_page_count = {int(pages)}")
            self._max_bytes = max_bytes

    def prune_tombstones(self, up_to_seq: int) -> None:
        """Forgets deletions at or before ``up_to_seq`` (a snapshot at that seq no longer needs them)."""
        with self._lock, self._transaction() as cur:
            cur.execute("DELETE FROM tombstones WHERE seq <= ?", (up_to_seq,))
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_seq', ?)", (str(up_to_seq),))

    # -- reads ----------------------------------------------------------------------------

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        found: dict[str, ChunkRecord] = {}
        with self._lock:
            for batch in batches(list(chunk_ids)):
                sql = f"SELECT chunk_id, {self._columns} FROM chunks WHERE chunk_id IN ({marks(len(batch))})"
                for cid, doc, n, text, title, start, end, meta, vec, align in self._conn.execute(sql, batch):
                    found[cid] = ChunkRecord(
                        cid, doc, n, text, title, start, end, json.loads(meta), _vector(vec), align
                    )
        return [found.get(c) for c in chunk_ids]

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
        """One list of hits per row of the ``(n, k)`` id and score arrays, in their order.
        Negative ids (FAISS padding) and ids no longer stored are skipped."""
        rows: dict[int, tuple[Any, ...]] = {}
        wanted = [int(i) for i in np.unique(ids) if i >= 0]
        with self._lock:
            for batch in batches(wanted):
                sql = (
                    "SELECT id, chunk_id, document_id, number, text, title, span_start, span_end,"
                    f" metadata, {self._alignment} FROM chunks WHERE id IN ({marks(len(batch))})"
                )
                rows.update((r[0], r[1:]) for r in self._conn.execute(sql, batch))
        result: list[list[Hit]] = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist(), strict=True):
            hits: list[Hit] = []
            for i, score in zip(row_ids, row_scores, strict=True):
                if (row := rows.get(i)) is not None:
                    cid, doc, number, text, title, start, end, meta, align = row
                    metadata = json.loads(meta)
                    hits.append(Hit(cid, doc, number, text, title, start, end, metadata, score, align))
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

    def count(self) -> int:
        """Live chunks. O(1): a counter kept in step with the rows."""
        return self._counter("chunks")

    def document_count(self) -> int:
        """Document rows (the registry rows of the documents whose registry shard this is). O(1)."""
        return self._counter("documents")

    def document_ids(self) -> set[str]:
        """The ids of the documents that have a chunk here. Scans every chunk: for tools and
        tests, never for health or metrics."""
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT DISTINCT document_id FROM chunks")}

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(document_ids, 0)
        with self._lock:
            for batch in batches(list(counts)):
                where = f"document_id IN ({marks(len(batch))})"
                sql = f"SELECT document_id, count(*) FROM chunks WHERE {where} GROUP BY 1"
                counts.update(self._conn.execute(sql, batch).fetchall())
        return counts

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        with self._lock:
            return read_document_rows(self._conn.cursor(), list(document_ids))

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        """The stored version of each id that has one (ids never written with a version: absent)."""
        if self._schema < 2:  # a read-only store from before versions
            return {}
        with self._lock:
            return read_versions(self._conn.cursor(), list(dict.fromkeys(document_ids)))

    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]:
        """Live chunks with ``chunk_id > after``, by ascending chunk id, at most ``limit``."""
        with self._lock:
            sql = f"SELECT chunk_id, {self._columns} FROM chunks WHERE chunk_id > ? ORDER BY chunk_id LIMIT ?"
            rows = self._conn.execute(sql, (after, int(limit))).fetchall()
        return [
            ChunkRecord(cid, doc, n, text, title, start, end, json.loads(meta), _vector(vec), align)
            for cid, doc, n, text, title, start, end, meta, vec, align in rows
        ]

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        """Documents with a row or a version here and ``document_id > after``, by ascending id, at
        most ``limit``."""
        with self._lock:
            if self._schema < 2:  # a read-only store from before versions
                ids_sql = "SELECT document_id FROM documents WHERE document_id > ? ORDER BY 1 LIMIT ?"
            else:
                ids_sql = (
                    "SELECT document_id FROM documents WHERE document_id > ?1 UNION SELECT document_id"
                    " FROM doc_versions WHERE document_id > ?1 ORDER BY 1 LIMIT ?2"
                )
            ids = [r[0] for r in self._conn.execute(ids_sql, (after, int(limit)))]
        rows, versions = self.get_document_rows(ids), self.get_document_versions(ids)
        return [DocumentEntry(d, rows.get(d), versions.get(d)) for d in ids]

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
        with self._lock:  # one read of the statistics and the search (a reader's view holds both)
            return self._keyword_search(terms, k, filter, title_weight)

    def _keyword_search(
        self, terms: list[str], k: int, filter: MetadataFilter | None, title_weight: float
    ) -> list[Hit]:
        # A word in at least half the shard's chunks gets FTS5's floor IDF (1e-6) in bm25(): it moves
        # no score past the sixth decimal, yet ORing it in made every search score most of the
        # shard. Such words are left out of the match unless every word is one (measured on 5,700
        # chunks: 12.5 -> 3-5 ms a SQuAD question; the top 10 the same for 200 of 200 questions).
        # (Words no chunk holds match nothing either way.)
        total = self._counter("chunks")
        count = "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?"
        held = {t: self._conn.execute(count, (f'"{t}"',)).fetchone()[0] for t in terms}
        rare = [t for t in terms if 0 < 2 * held[t] < total]
        match = " OR ".join(f'"{t}"' for t in rare or terms)
        # The top k by score first, over rowids and scores alone; then the k rows' columns (sorting
        # every match with its text was 1.5x slower: measured 19 vs 12.5 ms a SQuAD question on
        # 5,600 chunks). Only a filter needs the chunk rows of every match, for their metadata.
        if filter is None:
            top = "SELECT rowid AS id, -bm25(chunks_fts, 1.0, ?) AS score FROM chunks_fts"
            top += " WHERE chunks_fts MATCH ? ORDER BY score DESC, rowid LIMIT ?"
            params: list[Any] = []
        else:
            where, params = filter.to_sql("m.metadata")
            top = "SELECT m.id AS id, -bm25(chunks_fts, 1.0, ?) AS score FROM chunks_fts"
            top += f" JOIN chunks m ON m.id = chunks_fts.rowid WHERE chunks_fts MATCH ? AND {where}"
            top += " ORDER BY score DESC, m.id LIMIT ?"
        sql = (
            f"WITH top AS ({top}) SELECT c.chunk_id, c.document_id, c.number, c.text, c.title,"
            f" c.span_start, c.span_end, c.metadata, {self._alignment}, top.score"
            " FROM top JOIN chunks c ON c.id = top.id ORDER BY top.score DESC, c.id"
        )
        rows = self._conn.execute(sql, [float(title_weight), match, *params, int(k)]).fetchall()
        return [
            Hit(cid, doc, number, text, title, start, end, json.loads(meta), float(score), align)
            for cid, doc, number, text, title, start, end, meta, align, score in rows
        ]

    def metadata_fields(self) -> set[str]:
        """Every metadata key some live chunk has (filters on any other key match nothing).
        O(number of keys): read from a table of keys kept in step with the chunks."""
        sql = "SELECT key FROM metadata_keys"
        if self._schema < 2:  # a read-only store from before the table
            sql = "SELECT DISTINCT j.key FROM chunks, json_each(chunks.metadata) AS j"
        with self._lock:
            return {r[0] for r in self._conn.execute(sql)}

    # -- internals ------------------------------------------------------------------------

    def _open_for_write(self, model: str, dim: int) -> dict[str, str]:
        """Locks the directory, opens (creating or upgrading) the store; returns its meta."""
        self._connect(self.directory, DB_NAME)
        self._default_max_pages = int(self._conn.execute("PRAGMA max_page_count").fetchone()[0])
        with self._transaction() as cur:
            meta = store_schema.read_meta(cur)
            if not meta:
                return store_schema.create(cur, model, dim)
            store_schema.check_meta(meta, model, dim, self.directory)
            return store_schema.upgrade(cur, meta)

    def _open_read_only(self) -> dict[str, str]:
        uri = f"{(self.directory / DB_NAME).absolute().as_uri()}?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 10000")
        meta = store_schema.read_meta(self._conn)
        if "model" not in meta:
            raise IndexUnavailableError(f"shard {self.directory}: {DB_NAME} holds no store")
        store_schema.check_meta(meta, meta["model"], int(meta.get("dim", "0")), self.directory)
        return meta

    def _counter(self, name: str) -> int:
        with self._lock:
            if self._schema < 2:  # a read-only store from before the counters
                return int(self._conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
            row = self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            return int(row[0]) if row else 0


def fts_terms(query: str, limit: int = 64) -> list[str]:
    """The distinct words of ``query`` (lowercased, in order, at most ``limit``): what keyword
    search looks up. Each is quoted as an FTS5 string, so none is read as an operator."""
    return list(dict.fromkeys(w.lower() for w in _FTS_TERM.findall(query)))[:limit]


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, "<f4").astype(np.float32)


def _matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), dim).astype(np.float32)
