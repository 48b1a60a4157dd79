"""Keyword (BM25) search, kept in step with every write, on every backend that offers it: the FAISS
shard's store (SQLite FTS5) and Milvus (its BM25 over the same FTS5 words)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.faiss_index import FaissIndex
from actors.milvus_index import MilvusIndex
from actors.shard_store import DB_NAME, fts_terms
from actors.vector_index import ChunkRecord, DocumentRow, KeywordSearch, ShardWrite
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from schemas.settings import FaissConfig, MilvusConfig
from tests.unit.test_vector_index_contract import scratch_dir

DIM = 8
MODEL = "test/model-kw"

TEXTS = {
    "cats": "Cats are small carnivorous mammals. Cats sleep most of the day.",
    "dogs": "Dogs are loyal companions and were the first domesticated animals.",
    "runner": "She was running the marathon; runners run far.",
    "paris": "The Eiffel Tower stands in Paris, the capital of France.",
    "mixed": "A cat and a dog can live together.",
}


def record(doc: str, text: str, number: int = 0, **meta: str | int) -> ChunkRecord:
    rng = np.random.default_rng(abs(hash((doc, number))) % 2**32)
    v = rng.standard_normal(DIM).astype(np.float32)
    return ChunkRecord(
        chunk_id(doc, number), doc, number, text, doc.title(), 0, len(text), meta, v / np.linalg.norm(v)
    )


# Each backend opened on a shard directory (Milvus: Lite embedded in it).
OPENERS: dict[str, Callable[[Path], Any]] = {
    "faiss": lambda path: FaissIndex(path, MODEL, DIM, FaissConfig(omp_threads=1)),
    "milvus-lite": lambda path: MilvusIndex(path, MODEL, DIM, MilvusConfig()),
}


@pytest.fixture(params=sorted(OPENERS))
def opener(request: pytest.FixtureRequest) -> Callable[[Path], Any]:
    return OPENERS[request.param]


@pytest.fixture
def index(opener: Callable[[Path], Any]) -> Iterator[Any]:
    with scratch_dir() as d:
        idx = opener(d / "shard")
        idx.upsert([record(doc, text, lang="en" if doc != "paris" else "fr") for doc, text in TEXTS.items()])
        yield idx
        idx.close()


def ids(hits) -> list[str]:
    return [h.document_id for h in hits]


def test_the_backend_offers_keyword_search(index):
    assert isinstance(index, KeywordSearch)


def test_bm25_ranks_the_chunk_with_more_and_rarer_matches_first(index):
    [hits] = index.keyword_search(["cats sleeping"], 5)
    assert ids(hits)[0] == "cats"  # "cats" twice and "sleep" (stemmed) once
    assert set(ids(hits)) == {"cats", "mixed"}  # "cat" stems like "cats"; nothing else matches
    assert hits[0].score > hits[1].score > 0
    assert hits[0].text == TEXTS["cats"] and hits[0].span == (0, len(TEXTS["cats"]))


def test_stemming_and_case_folding(index):
    [hits] = index.keyword_search(["RUNS"], 5)
    assert ids(hits) == ["runner"]


def test_no_word_or_no_match_gives_no_hits(index):
    assert index.keyword_search(["", "  ?! ", "zebra"], 5) == [[], [], []]


@pytest.mark.parametrize(
    "query", ['"unbalanced', "cats AND", "NEAR(cats dogs)", "cats*", "title:cats", "-cats", "(cats", "a OR"]
)
def test_fts5_syntax_in_a_query_is_just_words(index, query):
    [hits] = index.keyword_search([query], 5)
    assert all(h.document_id in TEXTS for h in hits)
    if "cats" in query:
        assert "cats" in ids(hits)


def test_filter_applies_to_keyword_hits(index):
    [hits] = index.keyword_search(["the"], 10, MetadataFilter.parse({"lang": "fr"}))
    assert ids(hits) == ["paris"]


def test_k_limits_the_hits(index):
    [hits] = index.keyword_search(["cats dogs paris running"], 2)
    assert len(hits) == 2


def test_updates_deletes_and_truncation_reach_the_keyword_index(index):
    index.upsert([record("cats", "Now this chunk is about zebras only.")])
    assert ids(index.keyword_search(["zebras"], 5)[0]) == ["cats"]
    assert "cats" not in ids(index.keyword_search(["sleep"], 5)[0])
    index.apply(ShardWrite(delete_documents=["dogs"]))
    assert index.keyword_search(["loyal"], 5) == [[]]
    index.upsert([record("long", "alpha words", 0), record("long", "omega words", 1)])
    index.apply(ShardWrite(truncate={"long": 1}))
    assert index.keyword_search(["omega"], 5) == [[]]
    assert ids(index.keyword_search(["alpha"], 5)[0]) == ["long"]


def test_keyword_index_survives_reopen(index, opener):
    path = index.path
    index.close()
    reopened = opener(path)
    try:
        assert ids(reopened.keyword_search(["eiffel"], 5)[0]) == ["paris"]
    finally:
        reopened.close()


def test_a_store_from_before_the_keyword_index_is_indexed_on_open(tmp_path: Path):
    shard = tmp_path / "shard"
    idx = FaissIndex(shard, MODEL, DIM, FaissConfig(omp_threads=1))
    idx.upsert([record(doc, text) for doc, text in TEXTS.items()])
    idx.close()
    conn = sqlite3.connect(shard / DB_NAME)  # make it look like a store written before FTS5
    conn.executescript(
        "DROP TRIGGER chunks_fts_insert; DROP TRIGGER chunks_fts_delete; DROP TABLE chunks_fts;"
        "DELETE FROM meta WHERE key = 'keyword_index';"
    )
    conn.close()
    reopened = FaissIndex(shard, MODEL, DIM, FaissConfig(omp_threads=1))
    try:
        assert ids(reopened.keyword_search(["eiffel"], 5)[0]) == ["paris"]
        reopened.apply(ShardWrite(delete_documents=["paris"]))
        assert reopened.keyword_search(["eiffel"], 5) == [[]]
    finally:
        reopened.close()


def test_metadata_fields_lists_the_keys_in_use(index):
    assert index.metadata_fields() == {"lang"}
    index.upsert([record("extra", "x", year=2001), record("extra", "y", 1, year=2002)])
    assert index.metadata_fields() == {"lang", "year"}
    index.delete(["extra#0"])
    assert index.metadata_fields() == {"lang", "year"}  # "extra#1" still has a year
    index.upsert([record("extra", "y", 1)])  # replaced without one
    assert index.metadata_fields() == {"lang"}


def test_document_rows_keep_the_record_they_came_from(index):
    index.apply(
        ShardWrite(documents={"cats": DocumentRow("h1", 1, ("docs", 2, 41)), "dogs": DocumentRow("h2", 1)})
    )
    rows = index.get_document_rows(["cats", "dogs"])
    assert rows["cats"] == DocumentRow("h1", 1, ("docs", 2, 41))
    assert rows["dogs"].source is None


def test_fts_terms_are_distinct_lowercased_words():
    assert fts_terms('Who "won" Super_Bowl 50? who WON') == ["who", "won", "super_bowl", "50"]
