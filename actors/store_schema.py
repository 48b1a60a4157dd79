"""The shard store's tables, and how a store written by an older riverbed is upgraded in place.

Schema versions:

- 1: chunks, tombstones, documents (with the source of their record), the FTS5 keyword index,
  offsets. Its earliest stores lack the documents' source columns or the keyword index.
- 2: adds the version of the record behind each chunk (``chunks.source_*``) and each document
  (``doc_versions``), and counters kept by triggers in the same transaction as the rows they count
  (``counters``: live chunks and document rows; ``metadata_keys``: live chunks per metadata key),
  so every figure health and metrics ask for is one row read, never a scan.
- 3: adds each chunk's alignment to its document's text (``chunks.alignment``, see
  :mod:`actors.alignment`). Rows written before stay NULL ("not known"): their documents' text is
  not stored, so it cannot be derived here; a chunk gets one when its document is written again
  (the chunker's content hash changed with it, so that rewrite is never skipped as unchanged).

An upgrade is additive (columns and tables are added, nothing is dropped, no row is rewritten) and
runs in the same transaction that opens the store, so a crash mid-way leaves the store as it was.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

from schemas.errors import ConfigError

SCHEMA_VERSION = 3

BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS documents (document_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, updated_seq INTEGER NOT NULL,
    source_topic TEXT, source_partition INTEGER, source_offset INTEGER);
-- the newest record applied for each versioned document, kept after a delete so that an older
-- upsert arriving later is refused
CREATE TABLE IF NOT EXISTS doc_versions (document_id TEXT PRIMARY KEY, topic TEXT NOT NULL,
    partition INTEGER NOT NULL, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition));
"""
"""The tables of a store's bookkeeping: document rows, versions, committed offsets (the vector
shards' and the graph shards' alike)."""

_TABLES = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    chunk_id TEXT NOT NULL UNIQUE, document_id TEXT NOT NULL, number INTEGER NOT NULL,
    text TEXT NOT NULL, title TEXT, span_start INTEGER NOT NULL, span_end INTEGER NOT NULL,
    metadata TEXT NOT NULL,  -- JSON object, canonical (sorted keys)
    vector BLOB NOT NULL,    -- little-endian float32 x dim
    seq INTEGER NOT NULL,    -- the write that inserted the row
    -- the record that wrote the row (NULL: an unversioned write)
    source_topic TEXT, source_partition INTEGER, source_offset INTEGER,
    alignment TEXT  -- text positions in the document's text (NULL: written before schema 3)
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks (document_id, number);
CREATE INDEX IF NOT EXISTS chunks_seq ON chunks (seq);
-- covering index: a filter scans metadata without reading the text and vector of every row
CREATE INDEX IF NOT EXISTS chunks_metadata ON chunks (metadata);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones (seq);
{BOOKKEEPING}-- BM25 keyword index over chunk text and title, kept in step with `chunks` by triggers (rows are
-- only ever inserted and deleted; an update touches the source columns only); porter stemming,
-- diacritics folded
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, title, content='chunks',
    content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title) VALUES (new.id, new.text, new.title);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title) VALUES ('delete', old.id, old.text, old.title);
END;
-- O(1) figures: live rows per table, live chunks per metadata key (a key with none is deleted)
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS metadata_keys (key TEXT PRIMARY KEY, refs INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS chunks_count_insert AFTER INSERT ON chunks BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'chunks';
    INSERT INTO metadata_keys (key, refs) SELECT key, 1 FROM json_each(new.metadata) WHERE true
        ON CONFLICT (key) DO UPDATE SET refs = refs + 1;
END;
CREATE TRIGGER IF NOT EXISTS chunks_count_delete AFTER DELETE ON chunks BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'chunks';
    UPDATE metadata_keys SET refs = refs - 1 WHERE key IN (SELECT key FROM json_each(old.metadata));
    DELETE FROM metadata_keys WHERE refs <= 0 AND key IN (SELECT key FROM json_each(old.metadata));
END;
CREATE TRIGGER IF NOT EXISTS documents_count_insert AFTER INSERT ON documents BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'documents';
END;
CREATE TRIGGER IF NOT EXISTS documents_count_delete AFTER DELETE ON documents BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'documents';
END;
"""

# Columns later versions added to tables that stores of version 1 already have.
_ADDED_COLUMNS = {
    "documents": (("source_topic", "TEXT"), ("source_partition", "INTEGER"), ("source_offset", "INTEGER")),
    "chunks": (
        ("source_topic", "TEXT"),
        ("source_partition", "INTEGER"),
        ("source_offset", "INTEGER"),
        ("alignment", "TEXT"),
    ),
}
_COUNT_ROWS = (
    "INSERT OR REPLACE INTO counters VALUES"
    " ('chunks', (SELECT count(*) FROM chunks)), ('documents', (SELECT count(*) FROM documents))"
)
_COUNT_KEYS = (
    "INSERT INTO metadata_keys SELECT j.key, count(*) FROM chunks, json_each(chunks.metadata) AS j"
    " GROUP BY j.key"
)
_VERSIONS_FROM_DOCUMENTS = (
    "INSERT OR IGNORE INTO doc_versions SELECT document_id, source_topic, source_partition,"
    " source_offset FROM documents WHERE source_topic IS NOT NULL"
)


def read_meta(conn: sqlite3.Connection | sqlite3.Cursor) -> dict[str, str]:
    """The store's ``meta`` table as a dict; empty for a new (empty) database file."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    return dict(conn.execute("SELECT key, value FROM meta").fetchall()) if exists else {}


def check_meta(meta: dict[str, str], model: str, dim: int, directory: Path) -> None:
    """Raises :class:`ConfigError` when the store at ``directory`` was written for another model or
    dim, or by a newer riverbed (a schema this one does not know)."""
    if meta.get("model") != model or meta.get("dim") != str(dim):
        raise ConfigError(
            f"shard {directory} holds model {meta.get('model')!r} (dim {meta.get('dim')}), "
            f"not model {model!r} (dim {dim}): a new model means a new index"
        )
    version = schema_version(meta)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"shard {directory} has store schema {version}, written by a newer riverbed; this one "
            f"reads schema {SCHEMA_VERSION} and older"
        )


def schema_version(meta: dict[str, str]) -> int:
    """The schema version a store's meta records (1 for the earliest stores, which all say 1)."""
    return int(meta.get("schema_version", "1"))


def create(cur: sqlite3.Cursor, model: str, dim: int) -> dict[str, str]:
    """Creates every table of a new store and its ``meta``; returns the meta. Call inside a write
    transaction."""
    _create_tables(cur)
    cur.execute("INSERT OR IGNORE INTO counters VALUES ('chunks', 0), ('documents', 0)")
    meta = {
        "model": model,
        "dim": str(dim),
        "schema_version": str(SCHEMA_VERSION),
        "seq": "0",
        "keyword_index": "fts5",
        "store_id": uuid.uuid4().hex,
    }
    cur.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    return meta


def upgrade(cur: sqlite3.Cursor, meta: dict[str, str]) -> dict[str, str]:
    """Brings an existing store up to :data:`SCHEMA_VERSION` (idempotent: a current store only gets
    back tables or triggers someone dropped); returns the updated meta. Call inside a write
    transaction, after :func:`check_meta`."""
    version = schema_version(meta)
    for table, columns in _ADDED_COLUMNS.items():
        present = {r[1] for r in cur.execute(f"PRAGMA table_info({table})")}
        for column, kind in columns:
            if column not in present:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    _create_tables(cur)
    updates: dict[str, str] = {}
    if version < 2:  # counters and keys of the rows already there; the registry rows' versions
        cur.execute(_COUNT_ROWS)
        cur.execute("DELETE FROM metadata_keys")
        cur.execute(_COUNT_KEYS)
        cur.execute(_VERSIONS_FROM_DOCUMENTS)
    if version < SCHEMA_VERSION:
        updates["schema_version"] = str(SCHEMA_VERSION)
    if "keyword_index" not in meta:  # a store from before the keyword index: index what it holds
        cur.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")
        updates["keyword_index"] = "fts5"
    if "store_id" not in meta:
        updates["store_id"] = uuid.uuid4().hex
    cur.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", updates.items())
    return {**meta, **updates}


def _create_tables(cur: sqlite3.Cursor) -> None:
    # One statement at a time: ``executescript`` would commit the caller's transaction first.
    for statement in _statements(_TABLES):
        cur.execute(statement)


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` in order (a trigger's body stays whole)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]!r}")
