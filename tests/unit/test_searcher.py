"""The Searcher over in-process shards: modes, merging across shards, filter checks, and the rate
limit on re-reading the shards' metadata fields."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from actors.index_shard import IndexShard
from actors.testing import HashEmbedder
from actors.vector_index import ChunkRecord
from deployments.searcher import LocalShards, Searcher
from schemas.errors import IndexUnavailableError, InvalidRequestError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id, shard_of
from schemas.settings import FaissConfig, IndexConfig, SearchConfig
from tests.contract.helpers import scratch_dir

TEXTS = {
    "bronco": "The Denver Broncos won Super Bowl 50 against the Carolina Panthers.",
    "warsaw": "Warsaw is the capital and largest city of Poland.",
    "tesla": "Nikola Tesla developed the alternating current induction motor.",
    "normandy": "The Normans gave their name to Normandy, a region in France.",
    "poland": "Chloroplasts conduct photosynthesis in plant cells.",
}


class FakeClock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def searcher() -> Iterator[Searcher]:
    embedder = HashEmbedder(dim=64)
    with scratch_dir() as d:
        config = IndexConfig(n_shards=2, faiss=FaissConfig(omp_threads=1))
        shards = [IndexShard(config, d, i, embedder.model_name, embedder.dim) for i in range(2)]
        for s in shards:
            s.warm_up()
        for i, (doc, text) in enumerate(TEXTS.items()):
            cid = chunk_id(doc, 0)
            record = ChunkRecord(cid, doc, 0, text, doc, 0, len(text), {"n": i}, embedder.embed([text])[0])
            shards[shard_of(cid, 2)].index.upsert([record])
        assert all(s.count() > 0 for s in shards), "the fixture spreads chunks over both shards"
        clock = FakeClock()
        s = Searcher(SearchConfig(candidates=5), LocalShards(shards), fields_ttl_s=60, clock=clock)
        s.embed = embedder.embed  # type: ignore[attr-defined]
        s.fake_clock = clock  # type: ignore[attr-defined]
        yield s
        for shard in shards:
            shard.close()


def run(searcher: Searcher, query: str, mode: str, k: int = 3, filter: dict | None = None):
    vector = searcher.embed([query])[0] if mode != "keyword" else None  # type: ignore[attr-defined]
    parsed = MetadataFilter.parse(filter) if filter else None
    return asyncio.run(searcher.search(query, vector, k, parsed, mode))


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_every_mode_finds_the_passage_across_shards(searcher, mode):
    ranked = run(searcher, "Which city is the capital of Poland", mode)
    assert ranked[0].hit.document_id == "warsaw"
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)


def test_hybrid_keeps_both_ranks(searcher):
    top = run(searcher, "Tesla induction motor", "hybrid")[0]
    assert top.hit.document_id == "tesla"
    assert (top.vector_rank, top.keyword_rank) == (1, 1)
    c = searcher.config
    assert top.fused_score == pytest.approx(
        c.vector_weight / (c.rrf_k + 1) + c.keyword_weight / (c.rrf_k + 1)
    )


def test_filters_apply_in_every_mode(searcher):
    for mode in ("vector", "keyword", "hybrid"):
        ranked = run(searcher, "capital city motor plant France", mode, k=5, filter={"n": {"gte": 2}})
        assert ranked and all(r.hit.metadata["n"] >= 2 for r in ranked)


def test_an_unknown_filter_field_is_refused_naming_it(searcher):
    with pytest.raises(InvalidRequestError, match="unknown filter field 'yeer'; the index has: n") as err:
        run(searcher, "x", "vector", filter={"yeer": 1})
    assert err.value.param == "filter"


def test_a_caller_that_checked_the_filter_itself_gets_no_error_for_a_field_this_index_lacks(searcher):
    # An index searched beside another (passages and images): the field may be the other's.
    only_elsewhere = MetadataFilter.parse({"color": "red"})
    for mode in ("vector", "keyword", "hybrid"):
        vectors = searcher.embed(["red"]) if mode != "keyword" else None  # type: ignore[attr-defined]
        found = asyncio.run(
            searcher.search_many(["red"], vectors, 3, only_elsewhere, mode, check_filter=False)
        )
        assert found == [[]]


def test_a_searcher_of_images_says_so_on_every_result(searcher):
    images = Searcher(searcher.config, searcher.shards, modality="image")
    vector = searcher.embed(["Warsaw capital"])[0]  # type: ignore[attr-defined]
    for mode in ("vector", "keyword", "hybrid"):
        ranked = asyncio.run(images.search("Warsaw capital", vector, 3, None, mode))
        assert ranked and {r.modality for r in ranked} == {"image"}
    assert {r.modality for r in run(searcher, "Warsaw capital", "hybrid")} == {"text"}


def test_a_field_added_after_the_cache_is_accepted_after_the_next_refresh(searcher):
    run(searcher, "x", "vector", filter={"n": 1})  # reads the fields at t: {"n"}
    v = np.zeros(64, np.float32)
    v[0] = 1.0
    cid = chunk_id("new", 0)
    record = ChunkRecord(cid, "new", 0, "fresh", None, 0, 5, {"lang": "en"}, v)
    searcher.shards.shards[shard_of(cid, 2)].index.upsert([record])  # type: ignore[attr-defined]
    searcher.fake_clock.now += 59  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="unknown filter field 'lang'"):
        run(searcher, "fresh", "keyword", filter={"lang": "en"})  # the cache is younger than the TTL
    searcher.fake_clock.now += 1  # type: ignore[attr-defined]
    ranked = run(searcher, "fresh", "keyword", filter={"lang": "en"})
    assert [r.hit.document_id for r in ranked] == ["new"]


class CountingShards:
    """Shards whose only call is ``metadata_fields``; counts the round trips (each one a call to
    every shard). ``delay_s`` keeps a read in flight so that concurrent callers overlap."""

    def __init__(self, fields: list[set[str]], delay_s: float = 0.0) -> None:
        self.fields = fields
        self.delay_s = delay_s
        self.round_trips = 0

    async def metadata_fields(self) -> list[set[str]]:
        self.round_trips += 1
        await asyncio.sleep(self.delay_s)
        return [set(f) for f in self.fields]


def counting_searcher(shards: CountingShards, ttl_s: float = 5.0) -> tuple[Searcher, FakeClock]:
    clock = FakeClock()
    return Searcher(SearchConfig(), shards, fields_ttl_s=ttl_s, clock=clock), clock  # type: ignore[arg-type]


def test_unknown_field_requests_cost_at_most_one_round_trip_per_ttl():
    shards = CountingShards([{"year"}, {"lang"}])
    searcher, clock = counting_searcher(shards, ttl_s=5.0)
    typo = MetadataFilter.parse({"yeer": 2000})

    async def requests(n: int) -> None:
        for _ in range(n):
            with pytest.raises(
                InvalidRequestError, match="unknown filter field 'yeer'; the index has: lang, year"
            ):
                await searcher.check_filter(typo)

    asyncio.run(requests(200))
    assert shards.round_trips == 1
    clock.now += 4.9
    asyncio.run(requests(200))
    assert shards.round_trips == 1, "within the TTL the cache answers"
    clock.now += 0.1
    asyncio.run(requests(200))
    assert shards.round_trips == 2, "one more read once the TTL has passed"


def test_concurrent_unknown_field_requests_share_one_read():
    shards = CountingShards([{"year"}], delay_s=0.05)
    searcher, _ = counting_searcher(shards)
    typo = MetadataFilter.parse({"yeer": 2000})

    async def many() -> list[BaseException | None]:
        return await asyncio.gather(*(searcher.check_filter(typo) for _ in range(50)), return_exceptions=True)

    results = asyncio.run(many())
    assert all(isinstance(r, InvalidRequestError) for r in results)
    assert shards.round_trips == 1


def test_known_fields_cost_no_round_trip_once_read():
    shards = CountingShards([{"year"}, set()])
    searcher, clock = counting_searcher(shards)
    good = MetadataFilter.parse({"year": {"gte": 2000}})

    async def requests() -> None:
        for _ in range(100):
            await searcher.check_filter(good)

    asyncio.run(requests())
    clock.now += 3600
    asyncio.run(requests())
    assert shards.round_trips == 1, "a field the cache knows never needs the shards"


def test_a_failed_read_keeps_the_cache_and_raises():
    class Failing(CountingShards):
        async def metadata_fields(self) -> list[set[str]]:
            self.round_trips += 1
            raise IndexUnavailableError("shard 1 is restarting")

    shards = Failing([])
    searcher, _ = counting_searcher(shards)
    with pytest.raises(IndexUnavailableError, match="restarting"):
        asyncio.run(searcher.check_filter(MetadataFilter.parse({"year": 1})))
    assert searcher._fields == set()


def test_vector_modes_need_the_vector(searcher):
    with pytest.raises(InvalidRequestError, match="needs the query's vector"):
        asyncio.run(searcher.search("x", None, 3, None, "hybrid"))


# RayShards over fake actor handles: shard trouble is a 503 naming the shard, never a bug.
class FakeMethod:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args):
        return self.handle.call(self.name, *args)


class FakeHandle:
    """An actor handle whose calls answer ``answers[method]`` or raise ``error`` (after ``delay_s``)."""

    def __init__(self, shard: int, answers: dict, methods: tuple[str, ...] = ("health", "stats", "search")):
        self.shard, self.answers, self.methods = shard, answers, methods
        self.error: BaseException | None = None
        self.delay_s = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> FakeMethod:
        if name not in self.__dict__.get("methods", ()):
            raise AttributeError(name)
        return FakeMethod(self, name)

    async def call(self, name: str, *args):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.answers[name]


@pytest.fixture
def ray_shards(monkeypatch):
    import ray

    from deployments.retriever import RayShards
    from schemas.settings import load_settings

    settings = load_settings(overrides={"index": {"name": "wiki", "n_shards": 2}})
    generation = {"n": 0}
    fakes: dict[str, FakeHandle] = {}

    def get_actor(name: str, namespace: str | None = None) -> FakeHandle:
        if name not in fakes:
            raise ValueError(f"no actor {name}")
        generation["n"] += 1
        return fakes[name]

    monkeypatch.setattr(ray, "get_actor", get_actor)
    for i in range(2):
        answers = {
            "health": {"shard": i, "status": "ok", "problem": None, "chunks": 3, "vectors": 3},
            "stats": {"shard": i, "chunks": 3, "vectors": 3, "documents": 2, "offsets": {}, "path": "p"},
            "search": [[]],
        }
        fakes[f"wiki/shard/{i}"] = FakeHandle(i, answers)
    shards = RayShards(settings, timeout_s=0.2)
    shards.fakes = fakes  # type: ignore[attr-defined]
    shards.lookups = generation  # type: ignore[attr-defined]
    return shards


def ray_task_error(cause: BaseException) -> BaseException:
    """What awaiting a Ray task that raised ``cause`` raises: a RayTaskError that is also a ``cause``."""
    from ray.exceptions import RayTaskError

    return RayTaskError(
        "IndexShard.search", "Traceback (most recent call last): ...", cause
    ).as_instanceof_cause()


def search(shards) -> list:
    return asyncio.run(shards.search(np.zeros((1, 4), np.float32), 3, None))


def shard_error_cases() -> list:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    data = ray_task_error(IndexUnavailableError("shard 1 (/d/shard-001): store missing"))
    return [
        pytest.param(ActorDiedError(), "its actor died", id="died"),
        pytest.param(ActorUnavailableError("restarting", None), "restarting or unreachable", id="restarting"),
        pytest.param(RayActorError(), "restarting or unreachable", id="actor_error"),
        pytest.param(WorkerCrashedError(), "WorkerCrashedError", id="worker_crashed"),
        pytest.param(data, "store missing", id="data_unavailable"),
    ]


@pytest.mark.parametrize("error,reason", shard_error_cases())
def test_a_shard_in_trouble_is_unavailable_naming_index_and_shard(ray_shards, error, reason):
    from deployments.http_errors import as_api_error
    from deployments.retriever import ShardUnavailableError

    ray_shards.fakes["wiki/shard/1"].error = error
    with pytest.raises(ShardUnavailableError) as err:
        search(ray_shards)
    assert err.value.shard == 1 and "index 'wiki': shard 1 is unavailable" in str(err.value)
    assert reason in str(err.value)
    answer = as_api_error(ray_task_error(err.value))  # as the ingress sees it, out of the replica
    assert answer is not None and (answer.status, answer.code) == (503, "index_unavailable")
    assert "shard 1" in answer.message


def test_a_shard_that_does_not_answer_in_time_is_unavailable(ray_shards):
    from deployments.retriever import ShardUnavailableError

    ray_shards.fakes["wiki/shard/0"].delay_s = 1.0
    with pytest.raises(ShardUnavailableError, match="shard 0 is unavailable: it did not answer in time"):
        search(ray_shards)


def test_a_shard_that_died_for_good_is_looked_up_again_on_the_next_request(ray_shards):
    from ray.exceptions import ActorDiedError

    assert search(ray_shards) == [[[]], [[]]]
    assert ray_shards.lookups["n"] == 2
    search(ray_shards)
    assert ray_shards.lookups["n"] == 2, "handles are cached while their shards live"
    ray_shards.fakes["wiki/shard/1"].error = ActorDiedError()
    with pytest.raises(IndexUnavailableError):
        search(ray_shards)
    replacement = FakeHandle(1, ray_shards.fakes["wiki/shard/1"].answers)
    ray_shards.fakes["wiki/shard/1"] = replacement  # the pipeline re-created the actor
    assert search(ray_shards) == [[[]], [[]]]
    assert replacement.calls == 1 and ray_shards.lookups["n"] == 4


def test_a_restarting_shard_keeps_its_handle(ray_shards):
    from ray.exceptions import ActorUnavailableError

    search(ray_shards)
    ray_shards.fakes["wiki/shard/0"].error = ActorUnavailableError("restarting", None)
    with pytest.raises(IndexUnavailableError):
        search(ray_shards)
    ray_shards.fakes["wiki/shard/0"].error = None
    search(ray_shards)
    assert ray_shards.lookups["n"] == 2


def test_a_bug_in_a_shard_is_raised_as_the_shard_raised_it(ray_shards):
    from deployments.http_errors import as_api_error

    ray_shards.fakes["wiki/shard/0"].error = ray_task_error(KeyError("oops"))
    with pytest.raises(KeyError) as err:
        search(ray_shards)
    assert as_api_error(err.value) is None  # a bug stays a 500
    ray_shards.fakes["wiki/shard/0"].error = ray_task_error(InvalidRequestError("bad filter", param="filter"))
    with pytest.raises(InvalidRequestError):
        search(ray_shards)


def test_a_missing_shard_actor_is_unavailable(ray_shards):
    del ray_shards.fakes["wiki/shard/1"]
    with pytest.raises(IndexUnavailableError, match="not ready: shard 1's actor 'wiki/shard/1'"):
        search(ray_shards)


def test_health_answers_for_every_shard_whatever_its_state(ray_shards):
    from ray.exceptions import ActorUnavailableError

    fakes = ray_shards.fakes
    fakes["wiki/shard/0"].answers["health"] = {"shard": 0, "status": "degraded", "problem": "disk full",
                                               "chunks": 3, "vectors": 3}  # fmt: skip
    fakes["wiki/shard/1"].error = ActorUnavailableError("restarting", None)
    health = asyncio.run(ray_shards.health())
    assert health[0] == {"shard": 0, "status": "degraded", "problem": "disk full", "chunks": 3, "vectors": 3}
    assert health[1]["shard"] == 1 and health[1]["status"] == "unavailable"
    assert "restarting" in health[1]["problem"]
    stats = asyncio.run(ray_shards.stats())
    assert stats[0]["documents"] == 2 and stats[0]["status"] == "degraded"
    assert stats[1]["status"] == "unavailable" and "documents" not in stats[1]
    del fakes["wiki/shard/1"]
    assert "does not exist" in asyncio.run(ray_shards.health())[1]["problem"]


def test_health_of_a_shard_without_health_falls_back_to_its_stats(ray_shards):
    old = ray_shards.fakes["wiki/shard/0"]
    ray_shards.fakes["wiki/shard/0"] = FakeHandle(0, old.answers, methods=("stats", "search"))
    health = asyncio.run(ray_shards.health())
    assert health[0] == {"shard": 0, "status": "ok", "problem": None, "chunks": 3, "vectors": 3}


def test_a_shard_error_survives_the_trip_between_processes():
    import pickle

    from deployments.retriever import ShardUnavailableError

    sent = ShardUnavailableError("wiki", 1, "its actor died", died=True)
    got = pickle.loads(pickle.dumps(sent))
    assert (got.index, got.shard, got.reason, got.died, str(got)) == (
        "wiki",
        1,
        "its actor died",
        True,
        str(sent),
    )
