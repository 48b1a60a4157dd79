"""The ledger: document rows, versioned writes, offsets, and the scans that page through it all
(what `riverbed index copy` reads to move an index between backends without re-embedding). Needs
:class:`~tests.contract.base.IndexContract`'s ``open_index``; ``exact`` for the copy's searches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, DocumentEntry, DocumentRow, ShardWrite, VectorIndex, WriteResult
from tests.contract.base import IndexContract
from tests.contract.helpers import DIM, MODEL, make_corpus, make_document, unit


def v(offset: int, partition: int = 0, topic: str = "docs") -> tuple[str, int, int]:
    """A version: the record at ``offset`` of ``topic[partition]``."""
    return (topic, partition, offset)


def versioned(records: list[ChunkRecord], offset: int, content_hash: str = "h", **kw: object) -> ShardWrite:
    """The write of one document's new content, as the stream writes it: its chunks, the
    truncation of any longer tail, its row, all from the record at ``offset``."""
    doc = records[0].document_id
    return ShardWrite(
        upserts=records,
        truncate={doc: len(records)},
        documents={doc: DocumentRow(content_hash, len(records), v(offset))},
        versions={doc: v(offset)},
        **kw,  # type: ignore[arg-type]
    )


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


class LedgerContract(IndexContract):
    def test_document_rows(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        index.apply(ShardWrite(documents={"a": DocumentRow("h1", 3), "b": DocumentRow("h2", 1)}))
        index.apply(ShardWrite(documents={"a": DocumentRow("h1b", 2)}))
        assert index.document_count() == 2
        assert index.get_document_rows(["a", "b", "c"]) == {
            "a": DocumentRow("h1b", 2),
            "b": DocumentRow("h2", 1),
        }
        assert index.get_document_hashes(["a", "c"]) == {"a": "h1b"}

    def test_document_rows_keep_the_record_they_came_from(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        index.apply(
            ShardWrite(
                documents={"cats": DocumentRow("h1", 1, ("docs", 2, 41)), "dogs": DocumentRow("h2", 1)}
            )
        )
        rows = index.get_document_rows(["cats", "dogs"])
        assert rows["cats"] == DocumentRow("h1", 1, ("docs", 2, 41))
        assert rows["dogs"].source is None

    def test_offsets_are_max_merged(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        index.apply(ShardWrite(offsets={"docs": {0: 10, 1: 5}}))
        index.apply(ShardWrite(offsets={"docs": {0: 7, 2: 3}, "images": {0: 1}}))
        assert index.offsets() == {"docs": {0: 10, 1: 5, 2: 3}, "images": {0: 1}}

    # -- versioned writes: a change older than the version a shard holds never overwrites it ------

    def test_an_older_upsert_truncate_or_delete_is_ignored(self, make: Callable[..., VectorIndex]) -> None:
        rng = np.random.default_rng(20)
        index = make()
        newer, older = make_document(rng, "d", 3, text="new"), make_document(rng, "d", 5, text="old")
        other = make_document(rng, "e", 2)
        index.apply(versioned(newer, 8, "h-new"))
        result = index.apply(
            ShardWrite(
                upserts=older + other,
                truncate={"d": 5},
                documents={"d": DocumentRow("h-old", 5, v(5)), "e": DocumentRow("h-e", 2, v(6))},
                versions={"d": v(5), "e": v(6)},
            )
        )
        assert (result.stale, result.upserted, result.deleted) == (1, 2, 0)  # "e" is not held back
        assert index.get([r.chunk_id for r in older]) == [*newer, None, None]
        assert index.get_document_rows(["d"]) == {"d": DocumentRow("h-new", 3, v(8))}
        for change in (
            ShardWrite(truncate={"d": 1}, versions={"d": v(6)}),
            ShardWrite(delete_documents=["d"], versions={"d": v(7)}),
            ShardWrite(delete_chunks=[newer[0].chunk_id], versions={"d": v(7)}),
        ):
            assert index.apply(change) == WriteResult(0, 0, 0, stale=1)
        assert index.get([r.chunk_id for r in newer]) == newer
        assert index.get_document_versions(["d", "e", "never"]) == {"d": v(8), "e": v(6)}
        assert index.count() == index.vector_count() == 5

    def test_a_delete_then_an_older_upsert_stays_deleted(self, make: Callable[..., VectorIndex]) -> None:
        rng = np.random.default_rng(21)
        index = make()
        first, late = make_document(rng, "d", 2), make_document(rng, "d", 3, text="late")
        index.apply(versioned(first, 3))
        deleted = index.apply(ShardWrite(delete_documents=["d"], versions={"d": v(9)}))
        assert (deleted.deleted, index.count(), index.get_document_rows(["d"])) == (2, 0, {})
        assert index.get_document_versions(["d"]) == {"d": v(9)}  # remembered after the delete
        assert index.apply(versioned(late, 5)).stale == 1
        assert (index.count(), index.get_document_rows(["d"]), index.document_count()) == (0, {}, 0)
        assert index.search(late[0].vector[None], 3) == [[]]
        assert index.apply(versioned(late, 10)).upserted == 3  # a newer change applies
        assert index.get([r.chunk_id for r in late]) == late

    def test_the_same_version_again_is_idempotent(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        write = versioned(make_document(np.random.default_rng(22), "d", 4), 4, offsets={"docs": {0: 5}})
        index.apply(write)
        before = (index.get(["d#0", "d#3"]), index.get_document_rows(["d"]), index.offsets())
        again = index.apply(write)
        assert again == WriteResult(upserted=0, unchanged=4, deleted=0, stale=0)
        assert (index.get(["d#0", "d#3"]), index.get_document_rows(["d"]), index.offsets()) == before
        assert index.get_document_versions(["d"]) == {"d": v(4)} and index.count() == 4

    def test_unversioned_changes_always_apply_and_keep_the_version(
        self, make: Callable[..., VectorIndex]
    ) -> None:
        rng = np.random.default_rng(23)
        index = make()
        index.apply(versioned(make_document(rng, "d", 2), 9))
        replacement = make_document(rng, "d", 2, text="unversioned")
        assert index.apply(ShardWrite(upserts=replacement)).upserted == 2
        assert index.get(["d#0", "d#1"]) == replacement
        assert index.apply(ShardWrite(delete_documents=["d"])).deleted == 2
        assert index.get_document_versions(["d"]) == {"d": v(9)}

    @pytest.mark.parametrize("other", [v(2, partition=1), v(2, topic="other")], ids=["partition", "topic"])
    def test_a_version_from_another_partition_is_not_comparable(
        self, make: Callable[..., VectorIndex], other: tuple[str, int, int]
    ) -> None:
        rng = np.random.default_rng(24)
        index = make()
        index.apply(versioned(make_document(rng, "d", 2), 9))
        moved = make_document(rng, "d", 1, text="moved")
        result = index.apply(ShardWrite(upserts=moved, truncate={"d": 1}, versions={"d": other}))
        assert (result.stale, result.upserted, result.deleted) == (0, 1, 1)
        assert index.get(["d#0", "d#1"]) == [moved[0], None]
        assert index.get_document_versions(["d"]) == {"d": other}

    # -- scans: a copy made from the pages alone must answer every read as the original -----------

    @pytest.mark.parametrize("limit", [1, 7, 1000])
    def test_scans_page_through_every_chunk_and_document_in_id_order(
        self, make: Callable[..., VectorIndex], limit: int
    ) -> None:
        index = filled(make())
        chunks = scan_all_chunks(index, limit)
        ids = [c.chunk_id for c in chunks]
        assert ids == sorted(ids) and len(set(ids)) == len(ids) == index.count()
        assert index.get(ids) == chunks  # vectors, text, metadata, alignment: what get() answers

        entries: list[DocumentEntry] = []
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
        self, make: Callable[..., VectorIndex]
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
        if self.exact:  # an approximate original may miss a neighbour the exact copy finds
            want = [[h.chunk_id for h in hits] for hits in index.search(queries, 10)]
            assert [[h.chunk_id for h in hits] for hits in copy.search(queries, 10)] == want
        names = sorted({e.document_id for e in entries})
        assert copy.get_document_rows(names) == index.get_document_rows(names)
        assert copy.get_document_versions(names) == index.get_document_versions(names)
        assert copy.offsets() == index.offsets() and copy.count() == index.count()
