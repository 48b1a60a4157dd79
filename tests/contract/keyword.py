"""Keyword (BM25) search, kept in step with every write, for backends that offer
:class:`KeywordSearch`. Needs :class:`~tests.contract.base.IndexContract`'s ``open_index`` on a
store that a second opening of the same path reaches again (the reopen case)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from actors.vector_index import ChunkRecord, KeywordSearch, ShardWrite
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from tests.contract.base import IndexContract

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
    rng = np.random.default_rng(zlib.crc32(f"{doc}#{number}".encode()))
    v = rng.standard_normal(DIM).astype(np.float32)
    return ChunkRecord(
        chunk_id(doc, number), doc, number, text, doc.title(), 0, len(text), meta, v / np.linalg.norm(v)
    )


def ids(hits: list[Any]) -> list[str]:
    return [h.document_id for h in hits]


class KeywordContract(IndexContract):
    @pytest.fixture
    def index(self, make: Callable[..., Any]) -> Iterator[Any]:
        """The shard holding TEXTS, one chunk each, all English but "paris"."""
        idx = make(MODEL, DIM)
        idx.upsert([record(doc, text, lang="en" if doc != "paris" else "fr") for doc, text in TEXTS.items()])
        yield idx

    def test_the_backend_offers_keyword_search(self, index: Any) -> None:
        assert isinstance(index, KeywordSearch)

    def test_bm25_ranks_the_chunk_with_more_and_rarer_matches_first(self, index: Any) -> None:
        [hits] = index.keyword_search(["cats sleeping"], 5)
        assert ids(hits)[0] == "cats"  # "cats" twice and "sleep" (stemmed) once
        assert set(ids(hits)) == {"cats", "mixed"}  # "cat" stems like "cats"; nothing else matches
        assert hits[0].score > hits[1].score > 0
        assert hits[0].text == TEXTS["cats"] and hits[0].span == (0, len(TEXTS["cats"]))

    def test_stemming_and_case_folding(self, index: Any) -> None:
        [hits] = index.keyword_search(["RUNS"], 5)
        assert ids(hits) == ["runner"]

    def test_no_word_or_no_match_gives_no_hits(self, index: Any) -> None:
        assert index.keyword_search(["", "  ?! ", "zebra"], 5) == [[], [], []]

    @pytest.mark.parametrize(
        "query",
        ['"unbalanced', "cats AND", "NEAR(cats dogs)", "cats*", "title:cats", "-cats", "(cats", "a OR"],
    )
    def test_fts5_syntax_in_a_query_is_just_words(self, index: Any, query: str) -> None:
        [hits] = index.keyword_search([query], 5)
        assert all(h.document_id in TEXTS for h in hits)
        if "cats" in query:
            assert "cats" in ids(hits)

    def test_filter_applies_to_keyword_hits(self, index: Any) -> None:
        [hits] = index.keyword_search(["the"], 10, MetadataFilter.parse({"lang": "fr"}))
        assert ids(hits) == ["paris"]

    def test_k_limits_the_hits(self, index: Any) -> None:
        [hits] = index.keyword_search(["cats dogs paris running"], 2)
        assert len(hits) == 2

    def test_updates_deletes_and_truncation_reach_the_keyword_index(self, index: Any) -> None:
        index.upsert([record("cats", "Now this chunk is about zebras only.")])
        assert ids(index.keyword_search(["zebras"], 5)[0]) == ["cats"]
        assert "cats" not in ids(index.keyword_search(["sleep"], 5)[0])
        index.apply(ShardWrite(delete_documents=["dogs"]))
        assert index.keyword_search(["loyal"], 5) == [[]]
        index.upsert([record("long", "alpha words", 0), record("long", "omega words", 1)])
        index.apply(ShardWrite(truncate={"long": 1}))
        assert index.keyword_search(["omega"], 5) == [[]]
        assert ids(index.keyword_search(["alpha"], 5)[0]) == ["long"]

    def test_keyword_index_survives_reopen(self, index: Any, make: Callable[..., Any]) -> None:
        index.close()
        reopened = make(MODEL, DIM)
        assert ids(reopened.keyword_search(["eiffel"], 5)[0]) == ["paris"]

    def test_metadata_fields_lists_the_keys_in_use(self, index: Any) -> None:
        assert index.metadata_fields() == {"lang"}
        index.upsert([record("extra", "x", year=2001), record("extra", "y", 1, year=2002)])
        assert index.metadata_fields() == {"lang", "year"}
        index.delete(["extra#0"])
        assert index.metadata_fields() == {"lang", "year"}  # "extra#1" still has a year
        index.upsert([record("extra", "y", 1)])  # replaced without one
        assert index.metadata_fields() == {"lang"}
