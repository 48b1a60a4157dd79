"""The SQLite shard store beyond the contract: quotas, error kinds, O(1) counters, schema upgrades."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from actors.faiss_index import FaissIndex
from actors.shard_store import DB_NAME, SCHEMA_VERSION, ShardStore
from actors.store_write import classify
from actors.vector_index import ChunkRecord, DocumentRow, Hit, ShardWrite
from deployments.fusion import matched_terms
from schemas.errors import ConfigError, ProcessingError, RetryableError, StorageFullError
from schemas.settings import FaissConfig
from tests.contract.helpers import DIM, MODEL, make_corpus, make_document, scratch_dir, unit

FLAT = FaissConfig(kind="flat", omp_threads=1)


@pytest.fixture
def shard_dir() -> Iterator[Path]:
    with scratch_dir() as directory:
        yield directory / "shard-000"


def file_bytes(store: ShardStore) -> int:
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    return int(pages) * int(store._conn.execute("PRAGMA page_size").fetchone()[0])


def scanned(store: ShardStore) -> tuple[int, int, set[str]]:
    """Chunks, document rows and metadata keys counted the slow way, to check the counters."""
    conn = store._conn
    chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    documents = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
    keys = {r[0] for r in conn.execute("SELECT DISTINCT j.key FROM chunks, json_each(chunks.metadata) j")}
    return chunks, documents, keys


# -- disk full --------------------------------------------------------------------------------


def test_a_full_store_refuses_the_write_whole_and_takes_it_once_there_is_space(shard_dir: Path) -> None:
    corpus = make_corpus(seed=30, n_docs=120)
    index = FaissIndex(shard_dir, MODEL, DIM, FLAT)
    index.apply(ShardWrite(upserts=corpus[:20], offsets={"docs": {0: 20}}))
    store = index._open()
    index.set_max_bytes(file_bytes(store))  # not one page more
    big = ShardWrite(
        upserts=corpus[20:],
        delete_chunks=[corpus[0].chunk_id],
        documents={"doc-1": DocumentRow("h", 3)},
        offsets={"docs": {0: 500}},
    )
    with pytest.raises(StorageFullError, match=rf"shard {shard_dir}: disk full: .*quota"):
        index.apply(big)
    assert (index.count(), index.vector_count(), index.offsets()) == (20, 20, {"docs": {0: 20}})
    assert index.get([corpus[0].chunk_id, corpus[20].chunk_id]) == [corpus[0], None]
    assert index.get_document_rows(["doc-1"]) == {} and store.seq == 1
    index.set_max_bytes(None)  # space returns
    result = index.apply(big)
    assert (result.upserted, result.deleted) == (len(corpus) - 20, 1)
    assert index.count() == index.vector_count() == len(corpus) - 1
    assert index.offsets() == {"docs": {0: 500}}
    index.close()


def test_the_quota_is_set_on_open_and_validated(shard_dir: Path) -> None:
    store = ShardStore(shard_dir, MODEL, DIM, max_bytes=100 * 4096 + 5)  # whole pages
    assert store._conn.execute("PRAGMA max_page_count").fetchone()[0] == 100
    with pytest.raises(ValueError, match="max_bytes"):
        store.set_max_bytes(0)
    store.close()


# -- error kinds ------------------------------------------------------------------------------


def test_data_sqlite_cannot_store_is_a_processing_error_naming_the_chunk(shard_dir: Path) -> None:
    store = ShardStore(shard_dir, MODEL, DIM)
    good = make_document(np.random.default_rng(31), "good", 2)
    vector = good[0].vector
    bad_title = ChunkRecord("bad#0", "bad", 0, "text", "broken \ud800 title", 0, 4, {}, vector)
    no_text = ChunkRecord("null#0", "null", 0, None, None, 0, 4, {}, vector)  # type: ignore[arg-type]
    huge_span = ChunkRecord("huge#0", "huge", 0, "text", None, 0, 2**70, {}, vector)
    for bad, name in ((bad_title, "bad#0"), (no_text, "null#0"), (huge_span, "huge#0")):
        with pytest.raises(ProcessingError, match=rf"shard {shard_dir}: chunk '{name}' cannot be stored"):
            store.apply(ShardWrite(upserts=[*good, bad], offsets={"docs": {0: 3}}))
    with pytest.raises(ProcessingError, match=r"document 'd\\ud800' cannot be stored"):
        store.apply(ShardWrite(documents={"d\ud800": DocumentRow("h", 1)}))
    assert (store.count(), store.offsets(), store.seq) == (0, {}, 0)  # nothing of those writes
    store.apply(ShardWrite(upserts=good))
    assert store.count() == 2
    store.close()


def test_a_locked_store_is_retryable(shard_dir: Path) -> None:
    store = ShardStore(shard_dir, MODEL, DIM)
    store._conn.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(shard_dir / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(RetryableError, match="locked") as raised:
            store.apply(ShardWrite(offsets={"docs": {0: 1}}))
        assert not isinstance(raised.value, ProcessingError | StorageFullError)
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.apply(ShardWrite(offsets={"docs": {0: 1}}))
    store.close()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (sqlite3.OperationalError("database or disk is full"), StorageFullError),
        (sqlite3.OperationalError("disk I/O error"), RetryableError),
        (sqlite3.OperationalError("database is locked"), RetryableError),
        (sqlite3.OperationalError("Could not decode to UTF-8 column 'title' with text 'x'"), ProcessingError),
        (sqlite3.IntegrityError("UNIQUE constraint failed: chunks.chunk_id"), ProcessingError),
        (
            sqlite3.ProgrammingError("Error binding parameter 3: type 'dict' is not supported"),
            ProcessingError,
        ),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), ProcessingError),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), ProcessingError),
    ],
)
def test_errors_are_classified_by_what_the_caller_does(error: Exception, kind: type[Exception]) -> None:
    got = classify(error, "shard /x/shard-001", None)
    assert type(got) is kind and str(got).startswith("shard /x/shard-001: ")
    unknown = KeyError("x")
    assert classify(unknown, "shard /x", None) is unknown


# -- counters ---------------------------------------------------------------------------------


def test_counters_follow_every_kind_of_write(shard_dir: Path) -> None:
    store = ShardStore(shard_dir, MODEL, DIM)
    rng = np.random.default_rng(32)
    docs = {f"d{i}": make_document(rng, f"d{i}", 4) for i in range(6)}
    store.apply(ShardWrite(upserts=[r for recs in docs.values() for r in recs]))
    tagged = [ChunkRecord(**{**r.__dict__, "metadata": {"only_here": 1}}) for r in docs["d5"][:2]]
    writes = [
        ShardWrite(documents={d: DocumentRow("h", 4) for d in docs}),
        ShardWrite(upserts=tagged),  # replaces two chunks, with a key nobody else has
        ShardWrite(truncate={"d0": 1}, delete_chunks=["d1#0", "missing#3"]),
        ShardWrite(delete_documents=["d2", "never"], documents={"d3": DocumentRow("h2", 2)}),
        ShardWrite(delete_documents=["d5"]),  # the last chunks with "only_here"
    ]
    for write in writes:
        store.apply(write)
        assert (store.count(), store.document_count(), store.metadata_fields()) == scanned(store)
    assert "only_here" not in store.metadata_fields() and store.count() == 1 + 3 + 4 + 4
    store.close()


# -- schema upgrade ---------------------------------------------------------------------------

# The store as riverbed wrote it at schema version 1 (its last form, with the keyword index).
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id TEXT NOT NULL UNIQUE, document_id TEXT NOT NULL, number INTEGER NOT NULL,
    text TEXT NOT NULL, title TEXT, span_start INTEGER NOT NULL, span_end INTEGER NOT NULL,
    metadata TEXT NOT NULL, vector BLOB NOT NULL, seq INTEGER NOT NULL
);
CREATE INDEX chunks_document ON chunks (document_id, number);
CREATE INDEX chunks_seq ON chunks (seq);
CREATE INDEX chunks_metadata ON chunks (metadata);
CREATE TABLE tombstones (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX tombstones_seq ON tombstones (seq);
CREATE TABLE documents (document_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, updated_seq INTEGER NOT NULL,
    source_topic TEXT, source_partition INTEGER, source_offset INTEGER);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, title, content='chunks',
    content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text, title) VALUES (new.id, new.text, new.title);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text, title) VALUES ('delete', old.id, old.text, old.title);
END;
CREATE TABLE offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition));
"""


def write_v1_store(directory: Path, records: list[ChunkRecord]) -> None:
    """A store of schema version 1 holding ``records``, rows for two documents and offsets."""
    directory.mkdir(parents=True)
    conn = sqlite3.connect(directory / DB_NAME)
    conn.executescript(V1_SCHEMA)
    meta = {"model": MODEL, "dim": str(DIM), "schema_version": "1", "seq": "2", "keyword_index": "fts5"}
    conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    rows = [
        (r.chunk_id, r.document_id, r.number, r.text, r.title, r.start, r.end,
         json.dumps(r.metadata, sort_keys=True, separators=(",", ":")), r.vector.astype("<f4").tobytes())
        for r in records
    ]  # fmt: skip
    conn.executemany(
        "INSERT INTO chunks (chunk_id, document_id, number, text, title, span_start, span_end, metadata,"
        " vector, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        rows,
    )
    conn.executemany(
        "INSERT INTO documents VALUES (?, ?, ?, 2, ?, ?, ?)",
        [("doc-0", "h0", 3, "docs", 0, 17), ("doc-1", "h1", 2, None, None, None)],
    )
    conn.execute("INSERT INTO tombstones VALUES (9999, 2)")
    conn.execute("INSERT INTO offsets VALUES ('docs', 0, 42)")
    conn.commit()
    conn.close()


def test_a_version_1_store_is_upgraded_in_place(shard_dir: Path) -> None:
    corpus = [replace(r, alignment=None) for r in make_corpus(seed=33, n_docs=20)]  # none stored then
    write_v1_store(shard_dir, corpus)
    reader = ShardStore.read_only(shard_dir)  # before any writer opened it: read as it is
    assert (reader.count(), reader.document_count(), reader.get_document_versions(["doc-0"])) == (
        len(corpus),
        2,
        {},
    )
    reader.close()
    index = FaissIndex(shard_dir, MODEL, DIM, FLAT)
    store = index._open()
    assert store._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert SCHEMA_VERSION == 3 and len(store.store_id) == 32
    keys = {k for r in corpus for k in r.metadata}
    assert (index.count(), index.document_count(), index.metadata_fields()) == (len(corpus), 2, keys)
    assert index.vector_count() == len(corpus)
    assert index.get([r.chunk_id for r in corpus]) == corpus
    assert index.offsets() == {"docs": {0: 42}}
    assert index.get_document_rows(["doc-0"]) == {"doc-0": DocumentRow("h0", 3, ("docs", 0, 17))}
    assert index.get_document_versions(["doc-0", "doc-1"]) == {"doc-0": ("docs", 0, 17)}
    assert [h.chunk_id for h in index.search(corpus[7].vector[None], 1)[0]] == [corpus[7].chunk_id]
    assert len(index.keyword_search(["body"], 1000)[0]) == len(corpus)  # every chunk's text is "body ..."
    # the upgraded store keeps its counters and versions with new writes, and across reopening
    older = ShardWrite(delete_documents=["doc-0"], versions={"doc-0": ("docs", 0, 16)})
    assert index.apply(older).stale == 1
    index.apply(ShardWrite(delete_documents=["doc-0"], versions={"doc-0": ("docs", 0, 18)}))
    n0 = sum(r.document_id == "doc-0" for r in corpus)
    assert (index.count(), index.document_count()) == (len(corpus) - n0, 1)
    index.close()
    reopened = FaissIndex(shard_dir, MODEL, DIM, FLAT)
    assert (reopened.count(), reopened.vector_count(), reopened.document_count()) == (
        len(corpus) - n0,
    ) * 2 + (1,)
    assert scanned(reopened._open())[:2] == (len(corpus) - n0, 1)
    reopened.close()


def test_a_store_of_a_newer_schema_is_refused(shard_dir: Path) -> None:
    ShardStore(shard_dir, MODEL, DIM).close()
    conn = sqlite3.connect(shard_dir / DB_NAME)
    conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="store schema 4, written by a newer riverbed"):
        ShardStore(shard_dir, MODEL, DIM)
    with pytest.raises(ConfigError, match="store schema 4"):
        ShardStore.read_only(shard_dir)


def write_v2_store(directory: Path, records: list[ChunkRecord]) -> None:
    """A store of schema version 2 holding ``records``: today's tables less the alignment column,
    which is all that version 3 added."""
    store = ShardStore(directory, MODEL, DIM)
    store.apply(ShardWrite(upserts=records, documents={"old": DocumentRow("h-old", len(records))}))
    store.close()
    conn = sqlite3.connect(directory / DB_NAME)
    conn.execute("ALTER TABLE chunks DROP COLUMN alignment")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_a_version_2_store_migrates_and_its_chunks_answer_with_offsets_only_where_exact(
    shard_dir: Path,
) -> None:
    vectors = make_document(np.random.default_rng(34), "old", 2)
    # Chunk 0: ASCII text as long as its span. Chunk 1: its document said "Cafe\u0301  crème".
    old = [
        ChunkRecord("old#0", "old", 0, "plain words here", None, 0, 16, {}, vectors[0].vector),
        ChunkRecord("old#1", "old", 1, "Café crème", None, 17, 29, {}, vectors[1].vector),
    ]
    write_v2_store(shard_dir, old)
    reader = ShardStore.read_only(shard_dir)  # not upgraded: read as it is, no alignments
    assert [h.alignment for h in reader.keyword_search("words crème", 5)] == [None, None]
    reader.close()
    index = FaissIndex(shard_dir, MODEL, DIM, FLAT)
    store = index._open()
    assert store._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    assert index.get(["old#0", "old#1"]) == old and index.document_count() == 1
    plain, accented = (index.search(r.vector[None], 1)[0][0] for r in old)
    assert (plain.chunk_id, plain.alignment, accented.chunk_id, accented.alignment) == (
        "old#0",
        None,
        "old#1",
        None,
    )
    [words] = matched_terms("words", plain)
    assert (words["start"], words["end"]) == (6, 11)
    [creme] = matched_terms("creme", accented)
    assert (creme["term"], creme["start"], creme["end"], creme["text_start"]) == ("crème", None, None, 5)
    # Written again (the chunker's hash changed with alignments), the chunk gets its alignment.
    realigned = replace(old[1], alignment="[[0,0],[3,3,5],[4,5,7],[5,7]]")
    assert index.upsert([realigned]).upserted == 1
    [hit] = index.keyword_search(["crème"], 1)[0]
    assert isinstance(hit, Hit) and hit.alignment == realigned.alignment
    document = "plain words here Cafe\u0301  crème"
    [creme] = matched_terms("creme", hit)
    assert document[creme["start"] : creme["end"]] == "crème"  # type: ignore[misc]
    index.close()
    reopened = ShardStore.read_only(shard_dir)
    assert reopened.get(["old#1"]) == [realigned]
    reopened.close()


def test_keyword_search_leaves_out_words_most_chunks_hold_and_ranks_as_with_them(shard_dir: Path) -> None:
    """A word in at least half the chunks scores FTS5's floor IDF: leaving it out of the match
    keeps the ranking (checked against the full OR match, run here in SQL), and a query of such
    words alone still matches them."""
    rng = np.random.default_rng(7)
    words = ["river", "bank", "money", "stream", "loan", "water", "fish", "boat"]
    records = []
    for i, vector in enumerate(unit(rng, 60)):
        text = " ".join(["the", *rng.choice(words, size=int(rng.integers(1, 5))), "of"])
        records.append(ChunkRecord(f"d{i}#0", f"d{i}", 0, text, None, 0, len(text), {}, vector))
    index = FaissIndex(shard_dir, MODEL, DIM, FLAT)
    index.upsert(records)
    store = index._open()
    query, k = "the river of the bank", 8
    full = store._conn.execute(
        "SELECT c.chunk_id, -bm25(chunks_fts, 1.0, 0.5) AS score FROM chunks_fts"
        " JOIN chunks c ON c.id = chunks_fts.rowid WHERE chunks_fts MATCH ?"
        " ORDER BY score DESC, c.id LIMIT ?",
        ('"the" OR "river" OR "of" OR "bank"', k),
    ).fetchall()
    got = index.keyword_search([query], k)[0]
    assert [h.chunk_id for h in got] == [cid for cid, _ in full]
    assert [h.score for h in got] == pytest.approx([score for _, score in full], abs=1e-4)
    # Chunks holding none of the rarer words (they would score ~1e-6) no longer fill the list.
    rare = sum(1 for r in records if {"river", "bank"} & set(r.text.split()))
    assert 0 < rare < 60 and len(index.keyword_search([query], 100)[0]) == rare
    assert len(index.keyword_search(["the of"], 100)[0]) == 60  # only common words: all of them match
    index.close()
