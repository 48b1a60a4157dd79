"""Paging through everything a shard holds (``scan_chunks``, ``scan_documents``), on every
backend of the contract suite: what `riverbed index copy` reads to move an index between backends
without re-embedding. A copy made from the pages alone must answer every read as the original."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, DocumentRow, ShardWrite, VectorIndex
from tests.unit import test_vector_index_contract as contract
from tests.unit.test_vector_index_contract import DIM, MODEL, Backend, make_corpus, unit

backend = contract.backend  # the contract suite's fixtures: every backend, a fresh scratch shard each
make = contract.make


def scan_all_chunks(index: VectorIndex, limit: int) -> list[ChunkRecord]:
    out: list[ChunkRecord] = []
    while page := index.scan_chunks(out[-1].chunk_id if out else "", limit):
        assert len(page) <= limit
        out += page
    return out


def filled(index: VectorIndex) -> VectorIndex:
    """A corpus, then versioned updates, a shrinking update, deletions and offsets."""
    corpus = make_corpus(seed=3, n_docs=25)
    by_doc: dict[str, list[ChunkRecord]] = {}
    for r in corpus:
        by_doc.setdefault(r.document_id, []).append(r)
    docs = sorted(by_doc)
    index.apply(
        ShardWrite(
            upserts=corpus,
            documents={d: DocumentRow(f"h-{d}", len(by_doc[d]), ("docs", 0, i)) for i, d in enumerate(docs)},
            versions={d: ("docs", 0, i) for i, d in enumerate(docs)},
            offsets={"docs": {0: len(docs)}},
        )
    )
    shrunk = docs[0]
    index.apply(
        ShardWrite(
            truncate={shrunk: 1},
            documents={shrunk: DocumentRow("h-short", 1, ("docs", 0, 100))},
            versions={shrunk: ("docs", 0, 100)},
            offsets={"docs": {0: 101}},
        )
    )
    index.apply(
        ShardWrite(
            delete_documents=docs[1:4],
            versions=dict.fromkeys(docs[1:4], ("docs", 1, 7)),
            offsets={"docs": {1: 8}},
        )
    )
    # a document with a row but never versioned, and one unversioned chunk
    extra = ChunkRecord(
        "zz-last#0",
        "zz-last",
        0,
        "ünïcode text",
        None,
        0,
        12,
        {"k": True},
        unit(np.random.default_rng(9), 1)[0],
    )
    index.apply(ShardWrite(upserts=[extra], documents={"zz-last": DocumentRow("h-z", 1)}))
    return index


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_scans_page_through_every_chunk_and_document_in_id_order(
    make: Callable[..., VectorIndex], limit: int
):
    index = filled(make())
    chunks = scan_all_chunks(index, limit)
    ids = [c.chunk_id for c in chunks]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == index.count()
    assert index.get(ids) == chunks  # vectors, text, metadata, alignment: what get() answers

    entries = []
    while page := index.scan_documents(entries[-1].document_id if entries else "", limit):
        assert len(page) <= limit
        entries += page
    names = [e.document_id for e in entries]
    assert names == sorted(names) and len(set(names)) == len(names)
    rows = {e.document_id: e.row for e in entries if e.row is not None}
    versions = {e.document_id: e.version for e in entries if e.version is not None}
    assert rows == index.get_document_rows(names) and len(rows) == index.document_count()
    assert versions == index.get_document_versions(names)
    deleted = [e for e in entries if e.row is None]
    assert (
        [e.document_id for e in deleted]
        == sorted(e.document_id for e in deleted)[:3]
        == ["doc-1", "doc-10", "doc-11"]
    )
    assert all(e.version == ("docs", 1, 7) for e in deleted)  # a deletion keeps its version
    assert versions.get("zz-last") is None and rows["zz-last"] == DocumentRow("h-z", 1)


def test_a_copy_made_from_the_scans_answers_like_the_original(
    make: Callable[..., VectorIndex], backend: Backend
) -> None:
    index = filled(make())
    copy = InMemoryIndex(MODEL, DIM)
    copy.apply(ShardWrite(upserts=scan_all_chunks(index, 10)))
    entries = index.scan_documents("", 10_000)
    copy.apply(
        ShardWrite(
            documents={e.document_id: e.row for e in entries if e.row is not None},
            versions={e.document_id: e.version for e in entries if e.version is not None},
            offsets=index.offsets(),
        )
    )
    queries = unit(np.random.default_rng(5), 4)
    if backend.exact:  # an approximate original may miss a neighbour the exact copy finds
        want = [[h.chunk_id for h in hits] for hits in index.search(queries, 10)]
        assert [[h.chunk_id for h in hits] for hits in copy.search(queries, 10)] == want
    names = sorted({e.document_id for e in entries})
    assert copy.get_document_rows(names) == index.get_document_rows(names)
    assert copy.get_document_versions(names) == index.get_document_versions(names)
    assert copy.offsets() == index.offsets() and copy.count() == index.count()
