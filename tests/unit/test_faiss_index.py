"""FaissIndex specifics beyond the contract: snapshots, rebuilds, structures, the store's rules."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from actors.faiss_index import FaissIndex
from actors.shard_store import ShardStore
from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, ShardWrite
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError
from schemas.filters import MetadataFilter
from schemas.settings import FaissConfig
from tests.contract.helpers import (
    DIM,
    MODEL,
    assert_same_hits,
    ids,
    make_corpus,
    scratch_dir,
    unit,
)

KINDS = {
    "flat": FaissConfig(kind="flat", omp_threads=1),
    "ivf": FaissConfig(kind="ivf", ivf_nlist=4, ivf_nprobe=2, omp_threads=1),
    "hnsw": FaissConfig(kind="hnsw", hnsw_m=16, omp_threads=1),
}


@pytest.fixture
def shard_dir() -> Iterator[Path]:
    """A scratch directory, in RAM where the host allows (see scratch_dir)."""
    with scratch_dir() as directory:
        yield directory


@pytest.fixture(params=list(KINDS))
def config(request: pytest.FixtureRequest) -> FaissConfig:
    return KINDS[request.param]


def open_index(path: Path, config: FaissConfig, model: str = MODEL, dim: int = DIM) -> FaissIndex:
    return FaissIndex(path, model, dim, config)


def searches(index: FaissIndex | InMemoryIndex, queries: np.ndarray) -> list[list[list[str]]]:
    broad = MetadataFilter.parse({"lang": {"ne": "xx"}})
    return [[ids(h) for h in index.search(queries, 10, f)] for f in (None, broad)]


def test_snapshot_then_writes_then_reopen_gives_the_same_results(
    shard_dir: Path, config: FaissConfig, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = make_corpus(seed=1)
    index = open_index(shard_dir, config)
    index.upsert(corpus[:200])
    index.delete([r.chunk_id for r in corpus[:10]])  # masked in HNSW at snapshot time
    index.snapshot()
    changed = ChunkRecord(
        **{**corpus[50].__dict__, "text": "changed", "vector": unit(np.random.default_rng(4), 1)[0]}
    )
    index.apply(ShardWrite(upserts=[*corpus[200:], changed], delete_documents=[corpus[100].document_id]))
    queries = np.concatenate([unit(np.random.default_rng(2), 8), changed.vector[None]])
    before, count = searches(index, queries), index.count()
    index.close()
    with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
        reopened = open_index(shard_dir, config)
    assert "restored the snapshot" in caplog.text and "rebuilt" not in caplog.text
    assert reopened.count() == count and searches(reopened, queries) == before
    assert ids(reopened.search(changed.vector[None], 1)[0]) == [changed.chunk_id]
    reopened.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bitflip", "no-index-file", "bad-sidecar"])
def test_a_damaged_snapshot_falls_back_to_a_rebuild(
    shard_dir: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = make_corpus(seed=2)
    index = open_index(shard_dir, KINDS["flat"])
    index.upsert(corpus)
    index.snapshot()
    queries = unit(np.random.default_rng(3), 5)
    before = searches(index, queries)
    index.close()
    snap, sidecar = shard_dir / "index.faiss", shard_dir / "index.json"
    data = snap.read_bytes()
    if damage == "garbage":
        snap.write_bytes(b"not a faiss index" * 10)
    elif damage == "truncated":
        snap.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":  # still parses as an index: only the checksum notices
        snap.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage == "no-index-file":
        snap.unlink()
    else:
        sidecar.write_text("{not json")
    with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
        reopened = open_index(shard_dir, KINDS["flat"])
    assert "snapshot unusable" in caplog.text and "rebuilt" in caplog.text
    assert reopened.count() == len(corpus) and searches(reopened, queries) == before
    reopened.close()


@pytest.mark.parametrize(
    ("other", "why"),
    [
        (FaissConfig(kind="hnsw", omp_threads=1), "another structure"),
        (FaissConfig(kind="flat", omp_threads=1, hnsw_ef_search=7), None),  # search-time only
    ],
)
def test_a_snapshot_of_another_structure_is_rebuilt(
    shard_dir: Path, other: FaissConfig, why: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    index = open_index(shard_dir, KINDS["flat"])
    index.upsert(make_corpus(seed=3)[:50])
    index.snapshot()
    index.close()
    with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
        open_index(shard_dir, other).close()
    assert ("rebuilt" in caplog.text) == (why is not None)


def test_a_snapshot_ahead_of_its_store_is_not_trusted(
    shard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = make_corpus(seed=4)
    index = open_index(shard_dir / "a", KINDS["flat"])
    index.upsert(corpus)
    index.snapshot()
    index.close()
    other = open_index(shard_dir / "b", KINDS["flat"])  # an older store: fewer writes
    other.upsert(corpus[:5])
    other.close()
    for name in ("index.faiss", "index.json"):
        (shard_dir / "b" / name).write_bytes((shard_dir / "a" / name).read_bytes())
    with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
        reopened = open_index(shard_dir / "b", KINDS["flat"])
    assert "snapshot unusable" in caplog.text and reopened.count() == 5
    reopened.close()


def test_a_snapshot_forgets_deletions_up_to_the_one_before_so_only_older_snapshots_are_rebuilt(
    shard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = open_index(shard_dir, KINDS["flat"])
    store = index._open()
    corpus = make_corpus(seed=5)
    index.upsert(corpus)
    snapshots = []  # (seq, files) of each snapshot

    def snapshot() -> None:
        index.snapshot()
        files = {name: (shard_dir / name).read_bytes() for name in ("index.faiss", "index.json")}
        snapshots.append((store.seq, files))

    snapshot()
    index.delete([corpus[0].chunk_id])
    snapshot()
    assert len(store.removed_since(snapshots[0][0])) == 1  # kept: the first snapshot still needs it
    index.delete([corpus[1].chunk_id])
    snapshot()  # forgets the deletions up to the second snapshot
    with pytest.raises(ValueError, match="forgotten"):
        store.removed_since(snapshots[0][0])
    assert len(store.removed_since(snapshots[1][0])) == 1
    index.close()
    for (_, files), restored in ((snapshots[1], "restored the snapshot"), (snapshots[0], "rebuilt")):
        for name, data in files.items():
            (shard_dir / name).write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
            reopened = open_index(shard_dir, KINDS["flat"])
        assert restored in caplog.text
        assert reopened.count() == reopened.vector_count() == len(corpus) - 2
        assert reopened.get([corpus[0].chunk_id, corpus[1].chunk_id]) == [None, None]
        reopened.close()


def test_hnsw_masks_deletes_and_rebuilds_past_a_fifth(shard_dir: Path) -> None:
    corpus = make_corpus(seed=6)
    index = open_index(shard_dir, KINDS["hnsw"])
    index.upsert(corpus)
    index.delete([r.chunk_id for r in corpus[:20]])
    assert index._index.ntotal == len(corpus) and index.count() == len(corpus) - 20  # masked
    hits = index.search(np.stack([r.vector for r in corpus[:20]]), 5)
    assert not {h.chunk_id for row in hits for h in row} & {r.chunk_id for r in corpus[:20]}
    index.delete([r.chunk_id for r in corpus[20 : len(corpus) // 4]])  # past 20%: rebuilt
    assert index._index.ntotal == index.count() == len(corpus) - len(corpus) // 4
    index.close()


def test_ivf_searches_exactly_until_trained_then_retrains_as_it_grows(shard_dir: Path) -> None:
    corpus = make_corpus(seed=7, n_docs=200)  # about 1,000 chunks
    index = open_index(shard_dir, KINDS["ivf"])
    reference = InMemoryIndex(MODEL, DIM)
    for part in (corpus[:100], corpus[100:150]):  # below 39 * nlist = 156: a flat index
        index.upsert(part)
        reference.upsert(part)
    assert isinstance(index._index, faiss.IndexIDMap2)
    queries = unit(np.random.default_rng(8), 5)
    assert_same_hits(index.search(queries, 10), reference.search(queries, 10))
    index.upsert(corpus[150:200])
    assert isinstance(index._index, faiss.IndexIVFFlat) and index._trained_on == 200
    index.upsert(corpus[200:700])  # 700 <= 4 * 200: no retraining
    assert index._trained_on == 200
    index.upsert(corpus[700:])
    assert index._trained_on == len(corpus)
    assert index.count() == len(corpus) == index._index.ntotal
    index.close()


def test_broad_filters_search_faiss_restricted_to_matching_ids(shard_dir: Path, config: FaissConfig) -> None:
    corpus = make_corpus(seed=9)
    index = open_index(shard_dir, config.model_copy(update={"filter_exact_max": 1}))
    reference = InMemoryIndex(MODEL, DIM)
    for target in (index, reference):
        target.upsert(corpus)
        target.delete([r.chunk_id for r in corpus[:5]])
    queries = np.concatenate([unit(np.random.default_rng(10), 6), corpus[30].vector[None]])
    for raw in ({"lang": "en"}, {"source": {"in": ["a", "b"]}, "year": {"gte": 2000}}):
        f = MetadataFilter.parse(raw)
        got, want = index.search(queries, 8, f), reference.search(queries, 8, f)
        assert all(f.matches(h.metadata) for row in got for h in row)
        assert not {h.chunk_id for row in got for h in row} & {r.chunk_id for r in corpus[:5]}
        if config.kind == "flat":
            assert_same_hits(got, want)
    index.close()


_CRASH = """
import os, sys
from pathlib import Path
from actors.faiss_index import FaissIndex
from schemas.settings import FaissConfig
from tests.contract.helpers import DIM, MODEL, make_corpus
from actors.vector_index import ShardWrite
index = FaissIndex(Path(sys.argv[1]), MODEL, DIM, FaissConfig(omp_threads=1))
index.apply(ShardWrite(upserts=make_corpus(seed=11), offsets={"docs": {0: 77}}))
os._exit(9)  # no close, no snapshot, no atexit: as if the process were killed
"""


def test_a_write_survives_a_crash_right_after_apply(shard_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CRASH, str(shard_dir)], cwd=Path(__file__).parents[2], check=False
    )
    assert done.returncode == 9
    index = open_index(shard_dir, KINDS["flat"])  # the dead process's lock is gone with it
    assert index.count() == len(make_corpus(seed=11)) and index.offsets() == {"docs": {0: 77}}
    index.close()


def test_one_writer_per_shard_and_closed_means_unavailable(shard_dir: Path) -> None:
    index = open_index(shard_dir, KINDS["flat"])
    with pytest.raises(RetryableError, match=f"shard {shard_dir} is open by another writer"):
        open_index(shard_dir, KINDS["flat"])
    index.close()
    index.close()  # idempotent
    with pytest.raises(IndexUnavailableError, match="closed"):
        index.search(unit(np.random.default_rng(0), 1), 3)


def test_vector_errors_name_the_shard(shard_dir: Path) -> None:
    index = open_index(shard_dir, KINDS["flat"])
    bad = ChunkRecord("x#0", "x", 0, "t", None, 0, 1, {}, np.zeros(DIM * 2, np.float32))
    with pytest.raises(
        ValueError, match=rf"shard {shard_dir}: chunk 'x#0': .*\({DIM},\), got \({2 * DIM},\)"
    ):
        index.upsert([bad])
    with pytest.raises(ValueError, match=f"shard {shard_dir}: expected queries of shape"):
        index.search(np.zeros((1, 3), np.float32), 1)
    index.close()


def test_searches_on_other_threads_during_writes(shard_dir: Path, config: FaissConfig) -> None:
    corpus = make_corpus(seed=12)
    index = open_index(shard_dir, config)
    index.upsert(corpus[:50])
    errors: list[BaseException] = []

    def search() -> None:
        try:
            rng = np.random.default_rng(14)
            for _ in range(30):
                for row in index.search(unit(rng, 2), 5):
                    assert len(row) == 5
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(50, len(corpus), 50):
        index.apply(
            ShardWrite(upserts=corpus[start : start + 50], delete_chunks=[corpus[start - 50].chunk_id])
        )
    for t in threads:
        t.join()
    assert not errors
    assert index.count() == len(corpus) - len(range(50, len(corpus), 50))
    index.close()


def test_read_only_store_sees_committed_writes_and_refuses_its_own(shard_dir: Path) -> None:
    index = open_index(shard_dir, KINDS["flat"])
    corpus = make_corpus(seed=13)
    index.apply(ShardWrite(upserts=corpus, offsets={"docs": {1: 5}}))
    seq = index._open().seq
    index.apply(ShardWrite(upserts=corpus))  # identical: no new seq
    assert index._open().seq == seq
    reader = ShardStore.read_only(shard_dir)  # while the writer holds the shard, as `stats` does
    assert (reader.model, reader.dim, reader.count()) == (MODEL, DIM, len(corpus))
    assert reader.offsets() == {"docs": {1: 5}} and len(reader.document_ids()) == 60
    with pytest.raises(ConfigError, match="read-only"):
        reader.apply(ShardWrite(offsets={"docs": {1: 9}}))
    reader.close()
    index.close()


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_failed_mirroring_is_repaired_from_the_store(
    shard_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = make_corpus(seed=14)
    index = open_index(shard_dir, KINDS[kind])
    index.upsert(corpus[:40])
    structure_type = type(index._index)
    real_add = structure_type.add_with_ids
    calls = []

    def fail_once(self: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected: FAISS ran out of memory")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(structure_type, "add_with_ids", fail_once)
    with caplog.at_level(logging.ERROR, logger="actors.faiss_index"):
        result = index.upsert(corpus[40:41])  # committed to the store; FAISS misses it
    assert result.upserted == 1 and "missed a committed write" in caplog.text
    assert index.upsert(corpus[40:41]).unchanged == 1  # a retry finds it stored: adds nothing
    hits = index.search(corpus[40].vector[None], 1)[0]  # rebuilt from the store first
    assert [h.chunk_id for h in hits] == [corpus[40].chunk_id]
    assert index.vector_count() == index.count() == 41
    index.close()


def test_while_the_structure_cannot_be_rebuilt_writes_go_on_and_searches_are_unavailable(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = make_corpus(seed=17)
    index = open_index(shard_dir, KINDS["flat"])
    index.upsert(corpus[:10])

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise MemoryError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(faiss.IndexIDMap2, "add_with_ids", broken)
        index.upsert(corpus[10:11])
        assert index.upsert(corpus[11:12]).upserted == 1  # durable, though FAISS is behind
        with pytest.raises(IndexUnavailableError, match="behind the store and could not be rebuilt"):
            index.search(corpus[11].vector[None], 1)
    hits = index.search(np.stack([corpus[10].vector, corpus[11].vector]), 1)
    assert [row[0].chunk_id for row in hits] == [corpus[10].chunk_id, corpus[11].chunk_id]
    assert index.vector_count() == index.count() == 12
    index.close()


def test_count_is_the_store_and_vector_count_the_structure(shard_dir: Path) -> None:
    corpus = make_corpus(seed=15)
    index = open_index(shard_dir, KINDS["flat"])
    index.upsert(corpus[:30])
    assert index.count() == index.vector_count() == 30
    index._index.remove_ids(faiss.IDSelectorBatch(np.array([1, 2], np.int64)))  # drift, behind its back
    assert (index.count(), index.vector_count()) == (30, 28)
    index.close()


def test_chunks_carry_the_record_that_wrote_them(shard_dir: Path) -> None:
    corpus = [r for r in make_corpus(seed=16) if r.document_id == "doc-0"]
    doc = corpus[0].document_id
    index = open_index(shard_dir, KINDS["flat"])

    def stored() -> list[tuple[object, ...]]:
        sql = "SELECT id, source_topic, source_partition, source_offset FROM chunks ORDER BY chunk_id"
        return index._open()._conn.execute(sql).fetchall()

    index.upsert(corpus)
    assert {row[1:] for row in stored()} == {(None, None, None)}  # unversioned
    first_ids = [row[0] for row in stored()]
    seq = index._open().seq
    result = index.apply(ShardWrite(upserts=corpus, versions={doc: ("docs", 2, 40)}))
    assert (result.upserted, result.unchanged) == (0, len(corpus))
    assert stored() == [(i, "docs", 2, 40) for i in first_ids]  # same rows: no new FAISS ids
    assert index._open().seq == seq and index.vector_count() == len(corpus)
    changed = ChunkRecord(**{**corpus[0].__dict__, "text": "changed"})
    index.apply(ShardWrite(upserts=[changed], versions={doc: ("docs", 2, 41)}))
    assert ("docs", 2, 41) in {row[1:] for row in stored()}
    assert index.get_document_versions([doc]) == {doc: ("docs", 2, 41)}
    index.close()
