"""Filtered vector search: every backend's translation of a :class:`MetadataFilter` (SQL for
FAISS, a Milvus expression, ``matches`` itself for the reference) must select exactly what
:meth:`MetadataFilter.matches` selects. Needs :class:`~tests.contract.base.IndexContract`'s
``open_index`` and ``exact_filters``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, VectorIndex
from schemas.filters import MetadataFilter
from schemas.metadata import MetadataValue
from tests.contract.base import IndexContract
from tests.contract.helpers import assert_same_hits, unit
from tests.unit import test_filters, test_milvus_filters

FILTERS = [
    {"lang": "en"},
    {"year": {"gte": 2000, "lt": 2015}},
    {"source": {"in": ["a", "b"]}},
    {"year": {"lt": 1900}},  # matches nothing
    {"lang": {"ne": "de"}, "source": {"nin": ["c"]}},
    {"year": {"ne": 2000}},  # includes documents with no year
]

# Rows built to trip each translation (missing keys, one key holding several kinds, true against
# 1, int against float, int64 bounds, code-point order, quotes, backslashes, control characters), and
# the filters over them, from the translation tests of SQL (test_filters) and Milvus
# (test_milvus_filters): here they run through each backend's own write and search.
DIALECT_ROWS: list[Mapping[str, MetadataValue]] = [*test_milvus_filters.ROWS, *test_filters.DOCS]  # type: ignore[list-item]
DIALECT_FILTERS: list[dict[str, object]] = [
    *test_milvus_filters.CASES,
    *(raw for raw, _ in test_filters.CASES),
]


class FilterContract(IndexContract):
    @pytest.mark.parametrize("raw", FILTERS, ids=[str(f) for f in FILTERS])
    def test_filtered_search(
        self,
        make: Callable[..., VectorIndex],
        corpus: list[ChunkRecord],
        reference: InMemoryIndex,
        raw: dict[str, object],
    ) -> None:
        index = make()
        index.upsert(corpus)
        f = MetadataFilter.parse(raw)
        queries = np.concatenate([unit(np.random.default_rng(3), 5), corpus[1].vector[None]])
        got, want = index.search(queries, 8, f), reference.search(queries, 8, f)
        assert all(f.matches(h.metadata) for hits in got for h in hits)
        if self.exact_filters:
            assert_same_hits(got, want)
        else:
            assert [len(h) for h in got] == [len(h) for h in want]

    def test_missing_field_never_matches(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.upsert(corpus)
        without_year = {r.chunk_id for r in corpus if "year" not in r.metadata}
        assert without_year
        hits = index.search(corpus[0].vector[None], len(corpus), MetadataFilter.parse({"year": {"gte": 0}}))[
            0
        ]
        assert len(hits) == len(corpus) - len(without_year)
        assert not {h.chunk_id for h in hits} & without_year

    def test_every_dialect_filter_selects_what_matches_selects(
        self, make: Callable[..., VectorIndex]
    ) -> None:
        index = make()
        vectors = unit(np.random.default_rng(60), len(DIALECT_ROWS))
        records = [
            ChunkRecord(f"r{i}#0", f"r{i}", 0, "t", None, 0, 1, row, vectors[i])
            for i, row in enumerate(DIALECT_ROWS)
        ]
        index.upsert(records)
        for record, stored in zip(records, index.get([r.chunk_id for r in records]), strict=True):
            assert stored is not None  # metadata comes back with its values and their kinds
            assert json.dumps(stored.metadata, sort_keys=True) == json.dumps(record.metadata, sort_keys=True)
            assert {k: type(x) for k, x in stored.metadata.items()} == {
                k: type(x) for k, x in record.metadata.items()
            }
        query = unit(np.random.default_rng(61), 1)
        misses = {}
        for raw in DIALECT_FILTERS:
            f = MetadataFilter.parse(raw)
            got = {h.chunk_id for h in index.search(query, len(records), f)[0]}
            want = {r.chunk_id for r in records if f.matches(r.metadata)}
            if got != want if self.exact_filters else not got <= want:
                misses[json.dumps(raw, ensure_ascii=True)] = (sorted(got - want), sorted(want - got))
        assert not misses
