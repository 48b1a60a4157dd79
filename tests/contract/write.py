"""Writes: upsert, get and counts, re-applying, replacing, truncating, deleting, a failed write and
wrong vectors. Needs :class:`~tests.contract.base.IndexContract`'s ``open_index`` only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from actors.vector_index import (
    ChunkRecord,
    DocumentRow,
    KeywordSearch,
    Ledger,
    ShardWrite,
    VectorIndex,
    VectorSearch,
)
from schemas.filters import MetadataFilter
from tests.contract.base import IndexContract
from tests.contract.helpers import ALIGNMENTS, DIM, MODEL, ids, make_document, unit


class WriteContract(IndexContract):
    def test_protocol_and_identity(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        assert isinstance(index, VectorIndex)
        assert isinstance(index, Ledger) and isinstance(index, VectorSearch)  # the roles it fills
        assert (index.model, index.dim, index.count()) == (MODEL, DIM, 0)

    def test_upsert_get_count(self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]) -> None:
        index = make()
        result = index.upsert(corpus)
        assert (result.upserted, result.unchanged, result.deleted) == (len(corpus), 0, 0)
        assert index.count() == len(corpus)
        assert index.get([corpus[5].chunk_id, "nope#0", corpus[0].chunk_id]) == [corpus[5], None, corpus[0]]
        assert index.document_ids() == {r.document_id for r in corpus}
        assert index.vector_count() == len(corpus) and index.document_count() == 0  # no rows written
        n0 = sum(r.document_id == "doc-0" for r in corpus)
        assert index.document_chunk_counts(["doc-0", "nope"]) == {"doc-0": n0, "nope": 0}

    def test_reapplying_a_write_changes_nothing(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        kept = [r for r in corpus if r.document_id != "doc-1" or r.number < 2]
        write = ShardWrite(  # doc-1 now has 2 chunks
            upserts=kept,
            truncate={"doc-1": 2},
            documents={"doc-1": DocumentRow("h1", 2)},
            offsets={"docs": {0: 10}},
        )
        index.apply(write)
        before = (index.count(), index.offsets(), index.search(corpus[0].vector[None], 5))
        again = index.apply(write)
        assert again.upserted == 0 and again.deleted == 0
        assert (index.count(), index.offsets(), index.search(corpus[0].vector[None], 5)) == before
        assert index.get([r.chunk_id for r in corpus]) == [
            r if r.document_id != "doc-1" or r.number < 2 else None for r in corpus
        ]

    def test_changed_chunk_is_replaced(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.upsert(corpus)
        old = corpus[7]
        new_vector = unit(np.random.default_rng(99), 1)[0]
        new = ChunkRecord(
            old.chunk_id, old.document_id, old.number, "new text", None, 0, 8, {"lang": "xx"}, new_vector
        )
        assert index.upsert([new]).upserted == 1
        assert index.count() == len(corpus)
        assert index.get([old.chunk_id]) == [new]
        assert ids(index.search(new_vector[None], 1)[0]) == [old.chunk_id]
        assert old.chunk_id not in ids(index.search(old.vector[None], 3)[0])
        assert ids(index.search(new_vector[None], 5, MetadataFilter.parse({"lang": "xx"}))[0]) == [
            old.chunk_id
        ]

    def test_alignments_are_kept_as_written_and_a_new_one_replaces_the_chunk(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.upsert(corpus)
        sample = [next(r for r in corpus if r.number == n) for n in range(len(ALIGNMENTS))]
        stored = index.get([r.chunk_id for r in sample])
        assert [r.alignment if r is not None else "absent" for r in stored] == list(ALIGNMENTS)
        for record in sample:
            [top] = index.search(record.vector[None], 1)[0]
            assert (top.chunk_id, top.alignment) == (record.chunk_id, record.alignment)
        realigned = ChunkRecord(**{**sample[2].__dict__, "alignment": ""})  # re-chunked: now known
        assert index.upsert([realigned]).upserted == 1
        assert index.get([realigned.chunk_id]) == [realigned]
        assert index.search(realigned.vector[None], 1)[0][0].alignment == ""
        if isinstance(index, KeywordSearch):
            hits = index.keyword_search([sample[1].text], 50)[0]
            assert {h.chunk_id: h.alignment for h in hits}[sample[1].chunk_id] == ALIGNMENTS[1]
        with pytest.raises(ValueError, match="alignment must be a str"):
            ChunkRecord(**{**sample[0].__dict__, "alignment": [[0, 0]]})

    def test_truncate_removes_only_the_stale_tail(self, make: Callable[..., VectorIndex]) -> None:
        rng = np.random.default_rng(1)
        index = make()
        first, other = make_document(rng, "d", 6), make_document(rng, "e", 4)
        index.upsert(first + other)
        shorter = make_document(rng, "d", 3, text="v2")
        result = index.apply(ShardWrite(upserts=shorter, truncate={"d": 3}))
        assert (result.upserted, result.deleted) == (3, 3)
        assert index.get([r.chunk_id for r in first]) == [*shorter, None, None, None]
        assert index.get([r.chunk_id for r in other]) == other
        assert index.document_chunk_counts(["d", "e"]) == {"d": 3, "e": 4}
        assert first[4].chunk_id not in ids(index.search(first[4].vector[None], 10)[0])

    def test_delete_documents_and_chunks(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.apply(
            ShardWrite(
                upserts=corpus, documents={"doc-2": DocumentRow("h2", 3), "doc-3": DocumentRow("h3", 1)}
            )
        )
        doc2 = [r for r in corpus if r.document_id == "doc-2"]
        result = index.apply(ShardWrite(delete_documents=["doc-2", "never-seen"]))
        assert result.deleted == len(doc2)
        assert index.get([r.chunk_id for r in doc2]) == [None] * len(doc2)
        assert "doc-2" not in index.document_ids()
        assert index.get_document_hashes(["doc-2", "doc-3"]) == {"doc-3": "h3"}
        assert index.delete([corpus[0].chunk_id, "nope#1"]) == 1
        assert index.delete([corpus[0].chunk_id]) == 0
        assert index.count() == len(corpus) - len(doc2) - 1
        assert all(h.document_id != "doc-2" for h in index.search(doc2[0].vector[None], 20)[0])

    def test_failed_write_changes_nothing(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.upsert(corpus[:10])
        bad = ChunkRecord("x#0", "x", 0, "t", None, 0, 1, {}, np.zeros(DIM + 1, np.float32))
        with pytest.raises(ValueError, match=rf"\({DIM},\).*\({DIM + 1},\)"):
            index.apply(
                ShardWrite(upserts=[corpus[20], bad], delete_documents=["doc-0"], offsets={"t": {0: 9}})
            )
        assert (index.count(), index.offsets(), index.get(["x#0", corpus[20].chunk_id])) == (
            10,
            {},
            [None, None],
        )

    @pytest.mark.parametrize(
        ("vector", "message"),
        [
            (np.zeros(DIM, np.float64), "expected a float32 vector, got float64"),
            (np.zeros((1, DIM), np.float32), rf"shape \({DIM},\), got \(1, {DIM}\)"),
            (np.full(DIM, np.nan, np.float32), "NaN"),
        ],
    )
    def test_wrong_vectors_are_refused(
        self, make: Callable[..., VectorIndex], vector: np.ndarray, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            make().upsert([ChunkRecord("x#0", "x", 0, "t", None, 0, 1, {}, vector)])
