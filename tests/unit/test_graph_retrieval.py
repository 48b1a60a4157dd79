"""Graph mode over in-process shards and a graph store: a bridge passage that hybrid search misses
(it names neither the question's entity nor most of its words) is brought in through the entity
both passages share; without linked entities graph mode is hybrid; filters still apply."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

from actors import graph_query as q
from actors.graph_extract import MENTIONS, TITLE, ChunkGraph, Mention, Relation
from actors.graph_store import GraphStore
from actors.index_shard import IndexShard
from actors.testing import HashEmbedder
from actors.vector_index import ChunkRecord, DocumentRow, ShardWrite
from deployments.graph_retrieval import graph_ranking
from deployments.searcher import LocalShards, Searcher
from schemas.errors import InvalidRequestError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id, shard_of
from schemas.settings import FaissConfig, IndexConfig, SearchConfig
from tests.contract.helpers import scratch_dir

QUESTION = "Where was the director of Starfall born?"
TEXTS = {  # (title, text, kind)
    "starfall": ("Starfall", "Starfall is a 1998 film directed by Ada Quill.", "film"),
    "quill": ("Ada Quill", "Ada Quill grew up in Port Ember and studied painting there.", "person"),
    **{
        f"noise{i}": (f"Noise {i}", f"Where was the director born? Director {i} was born somewhere.", "noise")
        for i in range(6)
    },
}


def m(key: str, label: str, name: str) -> Mention:
    return Mention(key, name, label, 0, len(name), (0, 40))


FACTS = [
    ChunkGraph("starfall#0", "starfall", 0,
               (m("starfall", TITLE, "Starfall"), m("ada quill", "PERSON", "Ada Quill")),
               (Relation("starfall", "ada quill", MENTIONS, (0, 40)),)),
    ChunkGraph("quill#0", "quill", 0,
               (m("ada quill", TITLE, "Ada Quill"), m("port ember", "GPE", "Port Ember")),
               (Relation("ada quill", "port ember", MENTIONS, (0, 40)),)),
]  # fmt: skip


class LocalGraph:
    """The searcher's graph source over one in-process graph store."""

    def __init__(self, store: GraphStore) -> None:
        self.store = store

    async def link(self, question: str) -> list[str]:
        return q.link(question, self.store.known)

    async def expand(self, seeds: list[str], hops: int) -> nx.MultiDiGraph:
        async def fetch(keys: list[str]) -> nx.MultiDiGraph:
            return self.store.around(keys)

        async def details(keys: list[str]) -> nx.MultiDiGraph:
            return self.store.describe(keys)

        return await q.expand(fetch, seeds, hops, details=details)


@pytest.fixture
def searcher(tmp_path: Path) -> Iterator[Searcher]:
    embedder = HashEmbedder(dim=64)
    store = GraphStore(tmp_path / "graph", "test")
    store.apply(
        ShardWrite(upserts=FACTS, documents={"starfall": DocumentRow("h", 1), "quill": DocumentRow("h", 1)})
    )
    with scratch_dir() as d:
        config = IndexConfig(n_shards=2, faiss=FaissConfig(omp_threads=1))
        shards = [IndexShard(config, d, i, embedder.model_name, embedder.dim) for i in range(2)]
        for s in shards:
            s.warm_up()
        for doc, (title, text, kind) in TEXTS.items():
            cid = chunk_id(doc, 0)
            vector = embedder.embed([text])[0]
            record = ChunkRecord(cid, doc, 0, text, title, 0, len(text), {"kind": kind}, vector)
            shards[shard_of(cid, 2)].index.upsert([record])
        # graph_weight above 1: a passage only the graph finds can pass hybrid's second
        search = SearchConfig(candidates=4, graph_weight=2.0)
        s = Searcher(search, LocalShards(shards), graph=LocalGraph(store))
        s.embed = embedder.embed  # type: ignore[attr-defined]
        yield s
        for shard in shards:
            shard.close()
    store.close()


def run(searcher: Searcher, query: str, mode: str, k: int = 3, filter: dict | None = None):
    vector = searcher.embed([query])[0]  # type: ignore[attr-defined]
    parsed = MetadataFilter.parse(filter) if filter else None
    return asyncio.run(searcher.search(query, vector, k, parsed, mode))


def test_graph_mode_brings_in_the_bridge_passage_hybrid_misses(searcher: Searcher) -> None:
    hybrid = [r.hit.document_id for r in run(searcher, QUESTION, "hybrid", k=4)]
    assert "quill" not in hybrid  # the words are the noise's
    ranked = run(searcher, QUESTION, "graph", k=3)
    docs = [r.hit.document_id for r in ranked]
    assert "starfall" in docs and "quill" in docs
    bridge = next(r for r in ranked if r.hit.document_id == "quill")
    assert bridge.graph_rank is not None and bridge.graph_entities[0] == "ada quill"
    assert bridge.vector_score is not None and bridge.hit.text.startswith("Ada Quill")
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)


def test_without_an_entity_in_the_question_graph_mode_is_hybrid(searcher: Searcher) -> None:
    question = "Where was the director born?"
    assert run(searcher, question, "graph") == run(searcher, question, "hybrid")


def test_a_filter_keeps_graph_passages_out_too(searcher: Searcher) -> None:
    ranked = run(searcher, QUESTION, "graph", k=5, filter={"kind": {"in": ["film", "noise"]}})
    assert "quill" not in [r.hit.document_id for r in ranked]


def test_graph_mode_needs_a_graph(searcher: Searcher) -> None:
    searcher.graph = None
    with pytest.raises(InvalidRequestError, match="needs the index's knowledge graph"):
        run(searcher, QUESTION, "graph")


def test_the_title_of_a_neighbour_weighs_twice_its_mention(tmp_path: Path) -> None:
    """Chunks mentioning a neighbour score its weight times rrf_k; twice when it is their title."""
    store = GraphStore(tmp_path / "g", "test")
    other = ChunkGraph("other#0", "other", 0, (m("ada quill", "PERSON", "Ada Quill"),), ())
    store.apply(ShardWrite(upserts=[*FACTS, other]))
    ranking = graph_ranking(store.around(["starfall", "ada quill"]), ["starfall"], [], 10.0, 4, 10)
    scores = {g.chunk_id: g.score for g in ranking}
    floor = 1.0 / (10.0 + 4 + 1)  # the evidence chunk starfall#0 is not in the (empty) hybrid list
    assert scores["other#0"] == pytest.approx(floor * 10.0)
    assert scores["quill#0"] == pytest.approx(2 * floor * 10.0)
    assert scores["starfall#0"] == pytest.approx(1.0 + floor * 10.0 + floor)  # seed, neighbour, evidence
    assert [g.chunk_id for g in ranking] == ["starfall#0", "quill#0", "other#0"]
    store.close()
