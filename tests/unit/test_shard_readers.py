"""ReaderShards: a retriever reads FAISS shards in process where the actor names a store it can
open, answers as the actors would, sees a write as soon as it is committed, and goes back to the
actors when one stops serving, names another store, or its reader fails. The "actors" here are
the same IndexShard objects called in process (what a Ray actor runs), so both paths read one
store."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from actors.index_shard import IndexShard
from actors.vector_index import Hit
from deployments.retriever import RayShards, searchable
from deployments.searcher import LocalShards
from deployments.shard_readers import ReaderShards
from schemas.errors import IndexUnavailableError
from schemas.settings import FaissConfig, IndexConfig, load_settings
from tests.contract.helpers import DIM, MODEL, make_corpus, scratch_dir
from tests.unit.test_searcher import FakeClock

CONFIG = IndexConfig(n_shards=2, faiss=FaissConfig(omp_threads=1))


class InProcessActors:
    """:class:`ShardActors` over IndexShard objects, counting the calls each method gets."""

    def __init__(self, shards: list[IndexShard]) -> None:
        self.shards = shards
        self.n_shards = len(shards)
        self.calls: Counter[str] = Counter()
        self.sources: dict[int, Any] = {}  # what reader_source answers instead, per shard

    async def call_one(self, shard: int, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        self.calls[method] += 1
        if method == "reader_source" and shard in self.sources:
            return self.sources[shard]
        return getattr(self.shards[shard], method)(*args)


@pytest.fixture
def shards() -> Iterator[list[IndexShard]]:
    with scratch_dir() as d:
        opened = [IndexShard(CONFIG, d, i, MODEL, DIM) for i in range(2)]
        for shard in opened:
            shard.warm_up()
        corpus = make_corpus(seed=21)
        for i, shard in enumerate(opened):
            shard.index.upsert(corpus[i::2])
        yield opened
        for shard in opened:
            shard.close()


def ids(per_shard: list[list[list[Hit]]]) -> list[list[list[str]]]:
    return [[[h.chunk_id for h in row] for row in rows] for rows in per_shard]


def test_searches_read_in_process_and_answer_as_the_actors_do(shards):
    actors = InProcessActors(shards)
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, clock=FakeClock())
    queries = np.stack([r.vector for r in make_corpus(seed=22, n_docs=3)])
    got = asyncio.run(readers.search(queries, 5, None))
    assert readers.local() == [True, True]
    assert ids(got) == ids(asyncio.run(LocalShards(shards).search(queries, 5, None)))
    words = asyncio.run(readers.keyword_search(["body"], 5, None, 0.5))
    assert ids(words) == ids(asyncio.run(LocalShards(shards).keyword_search(["body"], 5, None, 0.5)))
    assert set(actors.calls) == {"reader_source"}  # no search went to an actor


def test_a_committed_write_is_found_by_the_next_search(shards):
    readers = ReaderShards(InProcessActors(shards), CONFIG.faiss, check_s=5.0, clock=FakeClock())
    new = make_corpus(seed=23, n_docs=1)[:1]
    queries = np.stack([r.vector for r in new])
    assert new[0].chunk_id not in {
        h.chunk_id for rows in asyncio.run(readers.search(queries, 3, None)) for h in rows[0]
    }
    shards[1].index.upsert(new)  # committed by the writer
    found = asyncio.run(readers.search(queries, 1, None))
    assert found[1][0][0].chunk_id == new[0].chunk_id


def test_a_shard_its_actor_stops_serving_is_asked_of_the_actor_once_a_check_has_said_so(shards):
    actors, clock = InProcessActors(shards), FakeClock()
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, clock=clock)
    queries = np.stack([r.vector for r in make_corpus(seed=24, n_docs=1)])

    async def scenario() -> None:
        await readers.search(queries, 3, None)
        shards[0].close()  # the actor no longer serves shard 0: reader_source says None
        assert shards[0].reader_source() is None
        clock.now += 5.0
        await readers.search(queries, 3, None)  # the reader answers while its actor is asked again
        await asyncio.sleep(0.1)  # the check in the background ends
        assert readers.local() == [False, True] and actors.calls["reader_source"] == 4
        with pytest.raises(IndexUnavailableError, match="shard 0"):
            await readers.search(queries, 3, None)  # the actor's own answer
        assert actors.calls["search"] == 1

    asyncio.run(scenario())


def test_a_reader_is_dropped_when_its_actor_moves_to_another_node_with_the_same_store(shards):
    actors, clock = InProcessActors(shards), FakeClock()
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, node="node-a", clock=clock)
    for shard in (0, 1):
        actors.sources[shard] = {**shards[shard].reader_source(), "node": "node-a"}
    queries = np.stack([r.vector for r in make_corpus(seed=28, n_docs=1)])

    async def scenario() -> None:
        await readers.search(queries, 3, None)
        assert readers.local() == [True, True]
        actors.sources[1] = {**actors.sources[1], "node": "node-b"}  # restarted elsewhere, same volume
        clock.now += 5.0
        await readers.search(queries, 3, None)
        await asyncio.sleep(0.1)
        assert readers.local() == [True, False]

    asyncio.run(scenario())


def test_a_shard_on_another_node_is_never_read_here_even_through_a_shared_volume(shards):
    actors = InProcessActors(shards)
    actors.sources[0] = {**shards[0].reader_source(), "node": "node-b"}
    actors.sources[1] = {**shards[1].reader_source(), "node": "node-a"}
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, node="node-a", clock=FakeClock())
    queries = np.stack([r.vector for r in make_corpus(seed=27, n_docs=1)])
    asyncio.run(readers.search(queries, 3, None))
    assert readers.local() == [False, True] and actors.calls["search"] == 1


def test_a_store_of_another_identity_at_that_path_is_not_read_here(shards):
    actors = InProcessActors(shards)
    actors.sources[1] = {**shards[1].reader_source(), "store_id": "another-nodes-store"}
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, clock=FakeClock())
    queries = np.stack([r.vector for r in make_corpus(seed=25, n_docs=1)])
    asyncio.run(readers.search(queries, 3, None))
    assert readers.local() == [True, False] and actors.calls["search"] == 1


def test_a_reader_that_fails_hands_the_call_to_the_actor(shards):
    actors = InProcessActors(shards)
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, clock=FakeClock())
    queries = np.stack([r.vector for r in make_corpus(seed=26, n_docs=1)])
    before = ids(asyncio.run(readers.search(queries, 3, None)))
    readers._readers[0].close()  # type: ignore[union-attr]  # its store gone from under it
    assert ids(asyncio.run(readers.search(queries, 3, None))) == before
    assert readers.local() == [False, True] and actors.calls["search"] == 1


def test_milvus_indexes_and_readers_off_search_through_the_actors():
    faiss = load_settings()
    assert isinstance(searchable(faiss, RayShards(faiss)), ReaderShards)
    for overrides in ({"index": {"backend": "milvus"}}, {"serve": {"search": {"readers": False}}}):
        settings = load_settings(overrides=overrides)
        assert isinstance(searchable(settings, RayShards(settings)), RayShards)


def test_a_bad_request_is_refused_as_the_actor_would_and_keeps_the_reader(shards):
    actors = InProcessActors(shards)
    readers = ReaderShards(actors, CONFIG.faiss, check_s=5.0, clock=FakeClock())
    with pytest.raises(ValueError, match="shard"):
        asyncio.run(readers.search(np.ones((1, DIM + 1), np.float32), 3, None))
    assert readers.local() == [True, True] and actors.calls["search"] == 0
