"""FaissIndex readers (read replicas of a shard beside its one writer): they see every write
committed before each call, whatever happened meanwhile (updates, deletes, snapshots that prune
the tombstones they need, rebuilds), hold no duplicate, and refuse to write."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from actors.faiss_index import FaissIndex
from actors.testing import InMemoryIndex
from schemas.errors import ConfigError, IndexUnavailableError
from schemas.filters import MetadataFilter
from tests.contract.helpers import DIM, MODEL, assert_same_hits, ids, make_corpus, scratch_dir, unit
from tests.unit.test_faiss_index import KINDS


@pytest.fixture
def shard_dir() -> Iterator[Path]:
    with scratch_dir() as directory:
        yield directory


def found_self(index: FaissIndex, records: list) -> list[str]:
    """The top hit of each record's own vector (every kind finds an exact duplicate first)."""
    hits = index.search(np.stack([r.vector for r in records]), 1)
    return [row[0].chunk_id if row else "" for row in hits]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_reader_sees_each_committed_write_before_its_next_search(shard_dir: Path, kind: str) -> None:
    config = KINDS[kind]
    writer = FaissIndex(shard_dir, MODEL, DIM, config)
    corpus = make_corpus(seed=11, n_docs=80)
    writer.upsert(corpus[:200])
    reader = FaissIndex.reader(shard_dir, config)
    assert reader.vector_count() == writer.count() == 200

    writer.upsert(corpus[200:])  # past IVF's training size: the reader trains its own centroids
    writer.delete([r.chunk_id for r in corpus[:30]])
    changed = [
        replace(r, text=r.text + " changed", vector=unit(np.random.default_rng(i), 1)[0])
        for i, r in enumerate(corpus[30:40])
    ]
    writer.upsert(changed)
    assert reader.vector_count() == writer.count() == len(corpus) - 30
    assert found_self(reader, changed) == [r.chunk_id for r in changed]
    assert [h[0].text for h in reader.search(np.stack([r.vector for r in changed]), 1)] == [
        r.text for r in changed
    ]
    gone = {h.chunk_id for row in reader.search(np.stack([r.vector for r in corpus[:30]]), 5) for h in row}
    assert not gone & {r.chunk_id for r in corpus[:30]}
    assert reader.seq == writer.seq
    reader.close()
    writer.close()


def test_a_flat_reader_ranks_exactly_as_the_writer_and_an_exact_reference(shard_dir: Path) -> None:
    writer = FaissIndex(shard_dir, MODEL, DIM, KINDS["flat"])
    reader = FaissIndex.reader(shard_dir, KINDS["flat"])
    reference = InMemoryIndex(MODEL, DIM)
    corpus = make_corpus(seed=12)
    for part in (corpus[:100], corpus[100:]):
        writer.upsert(part)
        reference.upsert(part)
    writer.delete([r.chunk_id for r in corpus[::7]])
    reference.delete([r.chunk_id for r in corpus[::7]])
    queries = unit(np.random.default_rng(13), 6)
    assert_same_hits(reader.search(queries, 10), reference.search(queries, 10))
    assert_same_hits(reader.search(queries, 10), writer.search(queries, 10))
    assert [ids(h) for h in reader.keyword_search(["body"], 5)] == [
        ids(h) for h in writer.keyword_search(["body"], 5)
    ]
    reader.close()
    writer.close()


def test_a_reader_behind_two_snapshots_starts_again_from_the_newest_and_one_that_kept_up_never_does(
    shard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = FaissIndex(shard_dir, MODEL, DIM, KINDS["flat"])
    corpus = make_corpus(seed=14)
    writer.upsert(corpus)
    lagging = FaissIndex.reader(shard_dir, KINDS["flat"])
    current = FaissIndex.reader(shard_dir, KINDS["flat"])
    with caplog.at_level(logging.INFO, logger="actors.faiss_index"):
        for gone in (corpus[:3], corpus[3:5]):
            writer.delete([r.chunk_id for r in gone])
            writer.snapshot()  # forgets the deletions up to the snapshot before it
            assert current.vector_count() == writer.count()  # keeps up between snapshots
        assert "restored the snapshot" not in caplog.text
        writer.upsert(make_corpus(seed=15, n_docs=3))
        assert lagging.vector_count() == writer.count() == current.vector_count()
    assert caplog.text.count("restored the snapshot") == 1  # the lagging one, once
    assert not set(found_self(lagging, corpus[:5])) & {r.chunk_id for r in corpus[:5]}
    for index in (lagging, current, writer):
        index.close()


def test_a_reader_searching_while_the_writer_writes_never_misses_a_commit_nor_doubles_a_vector(
    shard_dir: Path,
) -> None:
    writer = FaissIndex(shard_dir, MODEL, DIM, KINDS["flat"])
    reader = FaissIndex.reader(shard_dir, KINDS["flat"])
    corpus = make_corpus(seed=16, n_docs=120)
    committed = [0]  # chunks committed so far, raised after each write returns
    done = threading.Event()

    def write() -> None:
        for start in range(0, len(corpus), 7):
            writer.upsert(corpus[start : start + 7])
            committed[0] = min(start + 7, len(corpus))
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen = []
    while not done.is_set():
        before = committed[0]
        count = reader.vector_count()
        assert count >= before  # every write committed before the call is in
        seen.append(count)
    thread.join()
    assert seen == sorted(seen) and len(set(seen)) > 2  # it followed the writes as they came
    assert reader.vector_count() == len(corpus)
    top = reader.search(np.stack([r.vector for r in corpus]), 2)
    assert all(len({h.chunk_id for h in row}) == 2 for row in top)  # no vector twice
    assert [row[0].chunk_id for row in top] == [r.chunk_id for r in corpus]
    reader.close()
    writer.close()


@pytest.mark.parametrize("kind", list(KINDS))
def test_filtered_searches_during_writes_read_the_rows_of_the_commit_they_caught_up_to(
    shard_dir: Path, kind: str
) -> None:
    """The ids a filter allows and the hits' rows come from the same commit as the structure:
    a row committed meanwhile is neither missing from the structure nor a stored row without
    a vector (HNSW's exact path reconstructs every allowed id)."""
    writer = FaissIndex(shard_dir, MODEL, DIM, KINDS[kind])
    corpus = make_corpus(seed=18, n_docs=150)
    writer.upsert(corpus[:50])
    reader = FaissIndex.reader(shard_dir, KINDS[kind])
    done = threading.Event()

    def write() -> None:
        for start in range(50, len(corpus), 5):
            writer.upsert(corpus[start : start + 5])
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    broad = MetadataFilter.parse({"lang": {"ne": "xx"}})
    queries = unit(np.random.default_rng(19), 4)
    searches = 0
    while not done.is_set() or searches == 0:
        for row in reader.search(queries, 5, broad):
            assert len(row) == 5
        searches += 1
    thread.join()
    assert searches > 1 and reader.vector_count() == len(corpus)
    reader.close()
    writer.close()


def test_a_reader_refuses_to_write_or_snapshot_and_holds_no_writer_lock(shard_dir: Path) -> None:
    writer = FaissIndex(shard_dir, MODEL, DIM, KINDS["flat"])
    corpus = make_corpus(seed=17, n_docs=5)
    writer.upsert(corpus)
    reader = FaissIndex.reader(shard_dir, KINDS["flat"])
    with pytest.raises(ConfigError, match="a reader cannot write"):
        reader.upsert(corpus)
    with pytest.raises(ConfigError, match="a reader cannot write or snapshot"):
        reader.snapshot()
    writer.close()
    again = FaissIndex(shard_dir, MODEL, DIM, KINDS["flat"])  # the reader holds no lock
    assert again.count() == reader.count() == len(corpus)
    again.close()
    reader.close()


def test_a_reader_of_a_shard_that_has_no_store_is_unavailable_naming_it(shard_dir: Path) -> None:
    with pytest.raises(IndexUnavailableError, match=str(shard_dir / "nothing")):
        FaissIndex.reader(shard_dir / "nothing", KINDS["flat"])
