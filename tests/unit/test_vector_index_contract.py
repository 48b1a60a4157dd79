"""The VectorIndex contract, run on every backend: one suite, so no backend drifts from the others.

A backend joins by adding a :class:`Backend` to ``BACKENDS``. Exact backends must agree with the
InMemoryIndex reference hit for hit; approximate ones (IVF, HNSW) must return only hits that
satisfy the filter, best first, with high recall.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from actors.faiss_index import FaissIndex
from actors.milvus_index import MilvusIndex
from actors.testing import InMemoryIndex
from actors.vector_index import (
    ChunkRecord,
    DocumentRow,
    Hit,
    KeywordSearch,
    ShardWrite,
    VectorIndex,
    WriteResult,
)
from schemas.errors import ConfigError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from schemas.settings import FaissConfig, MilvusConfig

DIM = 32
MODEL = "test/model-a"


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[Path, str, int], VectorIndex]
    persistent: bool  # survives close + reopen of the same path
    exact: bool  # unfiltered search equals brute force
    exact_filters: bool  # filtered search equals brute force (at this test's sizes)


def faiss_backend(config: FaissConfig, exact: bool) -> Backend:
    def _open(path: Path, model: str, dim: int) -> VectorIndex:
        return FaissIndex(path, model, dim, config)

    # filter_exact_max (4096) exceeds the corpus, so every filtered search is brute force
    return Backend(f"faiss-{config.kind}", _open, persistent=True, exact=exact, exact_filters=True)


# One OpenMP thread: FAISS's thread start-up dwarfs the work at these sizes (100x on small hosts).
BACKENDS = [
    Backend("memory", lambda path, model, dim: InMemoryIndex(model, dim), False, True, True),
    faiss_backend(FaissConfig(kind="flat", omp_threads=1), exact=True),
    # nlist 4 trains at 156 vectors, so the corpus below is searched by IVF, approximately
    faiss_backend(FaissConfig(kind="ivf", ivf_nlist=4, ivf_nprobe=3, omp_threads=1), exact=False),
    faiss_backend(FaissConfig(kind="hnsw", hnsw_m=16, omp_threads=1), exact=False),
    # Milvus Lite, embedded in this process, in the shard directory; FLAT is exact
    Backend(
        "milvus-lite",
        lambda path, model, dim: MilvusIndex(path, model, dim, MilvusConfig()),
        persistent=True,
        exact=True,
        exact_filters=True,
    ),
]


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh directory, in RAM when the host has /dev/shm: the store fsyncs every write, which
    on a disk makes these tests three times slower. A process crash loses nothing either way."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="riverbed-test-", dir=base) as directory:
        yield Path(directory)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# Alignments as the chunker writes them: the identity, pieces, and none (a chunk from an old store).
ALIGNMENTS = ("", "[[0,0],[4,4,6],[5,6]]", None)


def make_document(rng: np.random.Generator, doc: str, n_chunks: int, text: str = "body") -> list[ChunkRecord]:
    meta: dict[str, str | int | float | bool] = {
        "lang": str(rng.choice(["en", "de", "fr"])),
        "source": str(rng.choice(["a", "b", "c"])),
    }
    if rng.random() < 0.8:  # some documents have no year: the "missing field" case
        meta["year"] = int(rng.integers(1990, 2025))
    vectors = unit(rng, n_chunks)
    return [
        ChunkRecord(
            chunk_id(doc, i),
            doc,
            i,
            f"{text} {doc} {i}",
            f"title {doc}",
            10 * i,
            10 * i + 9,
            meta,
            vectors[i],
            ALIGNMENTS[i % len(ALIGNMENTS)],
        )
        for i in range(n_chunks)
    ]


def make_corpus(seed: int = 0, n_docs: int = 60) -> list[ChunkRecord]:
    rng = np.random.default_rng(seed)
    return [r for d in range(n_docs) for r in make_document(rng, f"doc-{d}", int(rng.integers(2, 9)))]


def ids(hits: list[Hit]) -> list[str]:
    return [h.chunk_id for h in hits]


def assert_same_hits(got: list[list[Hit]], want: list[list[Hit]]) -> None:
    assert [ids(h) for h in got] == [ids(h) for h in want]
    for g, w in zip(got, want, strict=True):
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-5)
        assert g == [Hit(**{**h.__dict__, "score": x.score}) for h, x in zip(w, g, strict=True)]


FILTERS = [
    {"lang": "en"},
    {"year": {"gte": 2000, "lt": 2015}},
    {"source": {"in": ["a", "b"]}},
    {"year": {"lt": 1900}},  # matches nothing
    {"lang": {"ne": "de"}, "source": {"nin": ["c"]}},
    {"year": {"ne": 2000}},  # includes documents with no year
]


# Durability tests run on the backends that persist (the in-memory reference does not, by design).
DURABLE = [b for b in BACKENDS if b.persistent]
durable_only = pytest.mark.parametrize("backend", DURABLE, ids=[b.name for b in DURABLE], indirect=True)


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture
def make(backend: Backend) -> Iterator[Callable[..., VectorIndex]]:
    opened: list[VectorIndex] = []
    with scratch_dir() as directory:

        def _open(model: str = MODEL, dim: int = DIM) -> VectorIndex:
            index = backend.open(directory / "shard-0", model, dim)
            opened.append(index)
            return index

        yield _open
        for index in opened:
            index.close()


@pytest.fixture(scope="module")
def corpus() -> list[ChunkRecord]:
    return make_corpus()


@pytest.fixture(scope="module")
def reference(corpus: list[ChunkRecord]) -> InMemoryIndex:
    ref = InMemoryIndex(MODEL, DIM)
    ref.upsert(corpus)
    return ref


class TestVectorIndexContract:
    def test_protocol_and_identity(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        assert isinstance(index, VectorIndex)
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
        assert [r.alignment for r in index.get([r.chunk_id for r in sample])] == list(ALIGNMENTS)
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
        self,
        backend: Backend,
        make: Callable[..., VectorIndex],
        corpus: list[ChunkRecord],
        reference: InMemoryIndex,
    ) -> None:
        index = make()
        index.upsert(corpus)
        queries = unit(np.random.default_rng(7), 20)
        got, want = index.search(queries, 10), reference.search(queries, 10)
        if backend.exact:
            assert_same_hits(got, want)
        else:
            recall = np.mean([len(set(ids(g)) & set(ids(w))) / 10 for g, w in zip(got, want, strict=True)])
            assert recall >= 0.8

    @pytest.mark.parametrize("raw", FILTERS, ids=[str(f) for f in FILTERS])
    def test_filtered_search(
        self,
        backend: Backend,
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
        if backend.exact_filters:
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

    def test_offsets_are_max_merged(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        index.apply(ShardWrite(offsets={"docs": {0: 10, 1: 5}}))
        index.apply(ShardWrite(offsets={"docs": {0: 7, 2: 3}, "images": {0: 1}}))
        assert index.offsets() == {"docs": {0: 10, 1: 5, 2: 3}, "images": {0: 1}}

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

    def test_bad_queries_are_refused(self, make: Callable[..., VectorIndex]) -> None:
        index = make()
        with pytest.raises(ValueError, match="k must be"):
            index.search(np.zeros((1, DIM), np.float32), 0)
        with pytest.raises(ValueError, match=rf"shape \(n, {DIM}\), got \({DIM},\)"):
            index.search(np.zeros(DIM, np.float32), 3)
        with pytest.raises(ValueError, match="float32"):
            index.search(np.zeros((1, DIM)), 3)

    def test_k_larger_than_count(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord], reference: InMemoryIndex
    ) -> None:
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

    @durable_only
    def test_reopen_keeps_everything(
        self, backend: Backend, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.apply(
            ShardWrite(upserts=corpus, documents={"doc-1": DocumentRow("h", 4)}, offsets={"docs": {3: 42}})
        )
        index.delete([corpus[4].chunk_id])
        queries = unit(np.random.default_rng(5), 4)
        before = (index.search(queries, 10), index.search(queries, 10, MetadataFilter.parse({"lang": "en"})))
        index.close()
        reopened = make()
        assert reopened.count() == len(corpus) - 1
        assert reopened.get([r.chunk_id for r in corpus]) == [
            None if i == 4 else r for i, r in enumerate(corpus)
        ]
        assert reopened.offsets() == {"docs": {3: 42}}
        assert reopened.get_document_hashes(["doc-1"]) == {"doc-1": "h"}
        after = (
            reopened.search(queries, 10),
            reopened.search(queries, 10, MetadataFilter.parse({"lang": "en"})),
        )
        if backend.exact_filters:
            assert_same_hits(after[1], before[1])
        if backend.exact:  # an approximate structure rebuilt from the store may be trained anew
            assert_same_hits(after[0], before[0])

    @durable_only
    def test_other_model_or_dim_is_refused(
        self, backend: Backend, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        first = make()
        first.upsert(corpus[:3])
        first.close()
        with pytest.raises(
            ConfigError, match=r"model 'test/model-a' \(dim 32\).*model 'test/model-b' \(dim 32\)"
        ):
            make(model="test/model-b")
        with pytest.raises(ConfigError, match=r"\(dim 32\).*\(dim 16\)"):
            make(dim=16)
        assert make().count() == 3  # a refused open leaves the shard intact and unlocked


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


class TestVersionedWrites:
    """A change older than the version a shard holds for its document never overwrites it."""

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

    def test_versions_are_checked_and_normalised(self) -> None:
        for bad in [("docs", -1, 0), ("docs", 0), (0, 0, 0), ("docs", 0, 1.5), "docs:0:1"]:
            with pytest.raises(ValueError, match=r"versions\['d'\]"):
                ShardWrite(versions={"d": bad})  # type: ignore[dict-item]
        write = ShardWrite(versions={"d": ["docs", np.int64(1), np.int32(7)]})  # type: ignore[dict-item]
        assert write.versions == {"d": ("docs", 1, 7)}
        assert all(type(x) in (str, int) for x in write.versions["d"])
