"""The Searcher over in-process shards: modes, merging across shards, filter checks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from actors.index_shard import IndexShard
from actors.testing import HashEmbedder
from actors.vector_index import ChunkRecord
from deployments.searcher import LocalShards, Searcher
from schemas.errors import InvalidRequestError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id, shard_of
from schemas.settings import FaissConfig, IndexConfig, SearchConfig
from tests.unit.test_vector_index_contract import scratch_dir

TEXTS = {
    "bronco": "The Denver Broncos won Super Bowl 50 against the Carolina Panthers.",
    "warsaw": "Warsaw is the capital and largest city of Poland.",
    "tesla": "Nikola Tesla developed the alternating current induction motor.",
    "normandy": "The Normans gave their name to Normandy, a region in France.",
    "poland": "Chloroplasts conduct photosynthesis in plant cells.",
}


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
        s = Searcher(SearchConfig(candidates=5), LocalShards(shards), fields_ttl_s=60)
        s.embed = embedder.embed  # type: ignore[attr-defined]
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


def test_a_field_added_after_the_cache_is_accepted(searcher):
    run(searcher, "x", "vector", filter={"n": 1})  # caches {"n"} for 60 s
    v = np.zeros(64, np.float32)
    v[0] = 1.0
    cid = chunk_id("new", 0)
    record = ChunkRecord(cid, "new", 0, "fresh", None, 0, 5, {"lang": "en"}, v)
    searcher.shards.shards[shard_of(cid, 2)].index.upsert([record])  # type: ignore[attr-defined]
    ranked = run(searcher, "fresh", "keyword", filter={"lang": "en"})
    assert [r.hit.document_id for r in ranked] == ["new"]


def test_vector_modes_need_the_vector(searcher):
    with pytest.raises(InvalidRequestError, match="needs the query's vector"):
        asyncio.run(searcher.search("x", None, 3, None, "hybrid"))
