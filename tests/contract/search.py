"""Vector search without a filter: the exact reference agrees (or, for an approximate structure,
high recall), stored vectors find themselves, and the edge cases (``k`` over the count, an empty
shard, bad queries). Needs :class:`~tests.contract.base.IndexContract`'s ``open_index``, ``exact``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, VectorIndex
from schemas.filters import MetadataFilter
from tests.contract.base import IndexContract
from tests.contract.helpers import DIM, assert_same_hits, ids, unit


class SearchContract(IndexContract):
    def test_stored_vectors_find_themselves(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.upsert(corpus)
        sample = corpus[::9]
        results = index.search(np.stack([r.vector for r in sample]), 10)
        assert len(results) == len(sample)
        for record, hits in zip(sample, results, strict=True):
            assert hits[0].chunk_id == record.chunk_id
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)
            assert hits[0].text == record.text and hits[0].span == (record.start, record.end)
            assert len(hits) == 10 and [h.score for h in hits] == sorted(
                (h.score for h in hits), reverse=True
            )

    def test_search_agrees_with_reference(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord], reference: InMemoryIndex
    ) -> None:
        index = make()
        index.upsert(corpus)
        queries = unit(np.random.default_rng(7), 20)
        got, want = index.search(queries, 10), reference.search(queries, 10)
        if self.exact:
            assert_same_hits(got, want)
        else:
            recall = np.mean([len(set(ids(g)) & set(ids(w))) / 10 for g, w in zip(got, want, strict=True)])
            assert recall >= 0.8

    def test_bad_queries_are_refused(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        with pytest.raises(ValueError, match="k must be"):
            index.search(np.zeros((1, DIM), np.float32), 0)
        with pytest.raises(ValueError, match=rf"shape \(n, {DIM}\), got \({DIM},\)"):
            index.search(np.zeros(DIM, np.float32), 3)
        with pytest.raises(ValueError, match="float32"):
            index.search(np.zeros((1, DIM)), 3)

    def test_k_larger_than_count(self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]) -> None:
        index = make()
        index.upsert(corpus[:25])
        index.delete([corpus[0].chunk_id])
        hits = index.search(corpus[3].vector[None], 1000)[0]
        assert len(hits) == 24 and hits[0].chunk_id == corpus[3].chunk_id
        assert {h.chunk_id for h in hits} == {r.chunk_id for r in corpus[1:25]}

    def test_empty_index_search(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        queries = unit(np.random.default_rng(0), 3)
        assert index.search(queries, 5) == [[], [], []]
        assert index.search(queries, 5, MetadataFilter.parse({"lang": "en"})) == [[], [], []]
        assert index.search(np.zeros((0, DIM), np.float32), 5) == []
