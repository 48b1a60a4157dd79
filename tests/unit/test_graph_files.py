"""`riverbed graph stats` and `graph export`: a two-shard graph read back from its stores (while a
shard still holds its writer lock, as a running shard actor does), counted and written as GraphML
and JSON that read back to the same graph."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest

from actors.graph_extract import for_shard
from actors.graph_store import GraphStore
from actors.vector_index import ShardWrite
from cluster.graph_files import draw_neighbourhood, export_graph, graph_stats, neighbourhood_tree, read_graph
from schemas.errors import ConfigError, IndexUnavailableError, NotFoundError
from schemas.ids import shard_of
from schemas.settings import Settings, load_settings
from schemas.topology import shard_directory
from tests.unit.test_graph_query import GRAPHS, MODEL, write


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings(overrides={"home": str(tmp_path / "home"), "graph": {"n_shards": 2}})
    side = s.graph_side()
    stores = [GraphStore(shard_directory(side.data_dir, i), MODEL) for i in range(2)]
    for i, store in enumerate(stores):
        part = write([for_shard(g, i, 2) for g in GRAPHS])  # each document's row on its registry shard
        rows = {d: row for d, row in part.documents.items() if shard_of(d, 2) == i}
        store.apply(ShardWrite(upserts=part.upserts, documents=rows))
    stores[0].close()  # shard 1 stays open, its writer lock held
    return s


def test_stats_count_the_merged_graph(settings: Settings) -> None:
    stats = graph_stats(settings, top=2)
    one = nx.MultiDiGraph()
    for g in GRAPHS:  # the graph counted directly from the facts
        for m in g.mentions:
            one.add_node(m.key)
        for r in g.relations:
            one.add_edge(r.source, r.target, key=r.label)
    assert stats["entities"] == one.number_of_nodes() == 8
    assert stats["edges"] == one.number_of_edges()
    assert stats["mentions"] == sum(len(g.mentions) for g in GRAPHS)
    assert stats["chunks"] == len(GRAPHS) and stats["documents"] == 4
    assert [e["key"] for e in stats["top_entities"]] == ["thomas edison", "menlo park"]  # degree 3, 2...
    assert stats["relations_by_label"] == dict(Counter(label for _, _, label in one.edges(keys=True)))


def test_riverbed_stats_counts_the_graph_from_its_stores_rows(settings: Settings, tmp_path: Path) -> None:
    from cluster.stats import graph_counts

    counts = graph_counts(settings)
    assert counts is not None
    assert counts["mentions"] == sum(len(g.mentions) for g in GRAPHS)  # counted from the facts
    assert counts["documents"] == 4
    assert set(counts["per_shard"]) == {"0", "1"}
    relations = sum(c["relations"] for c in counts["per_shard"].values())
    assert relations >= len({(r.source, r.target, r.label) for g in GRAPHS for r in g.relations})
    empty = load_settings(overrides={"home": str(tmp_path / "empty")})
    assert graph_counts(empty) is None


@pytest.mark.parametrize("fmt", ["graphml", "json"])
def test_an_export_reads_back_as_the_same_graph(settings: Settings, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"g.{fmt}"
    counts = export_graph(settings, fmt, out)  # type: ignore[arg-type]
    graph, _ = read_graph(settings)
    assert counts == {"nodes": graph.number_of_nodes(), "edges": graph.number_of_edges()}
    if fmt == "graphml":
        back = nx.read_graphml(out, force_multigraph=True)
        edge = next(d for a, b, d in back.edges(data=True) if (a, b) == ("menlo park", "new jersey"))
        assert json.loads(edge["chunks"]) == ["park#0"] and edge["relation"] == "locate in"
        assert back.nodes["thomas edison"]["name"] == "Thomas Edison"
    else:
        back = nx.node_link_graph(json.loads(out.read_text()), edges="edges")
        assert back.nodes["nikola tesla"]["aliases"] == ["Tesla"]
    assert back.number_of_nodes() == graph.number_of_nodes()
    assert back.number_of_edges() == graph.number_of_edges()


def test_an_index_without_a_graph_is_named(tmp_path: Path) -> None:
    s = load_settings(overrides={"home": str(tmp_path / "empty")})
    with pytest.raises(IndexUnavailableError, match="holds no graph"):
        graph_stats(s)


def test_a_drawn_neighbourhood_is_the_entity_and_those_within_its_hops(
    settings: Settings, tmp_path: Path
) -> None:
    graph, _ = read_graph(settings)
    near = nx.single_source_shortest_path_length(graph.to_undirected(), "thomas edison", cutoff=1)
    out = tmp_path / "edison.png"
    drawn = draw_neighbourhood(settings, "Thomas Edison", 1, 30, out)
    assert drawn["entity"] == "thomas edison" and drawn["nodes"] == len(near)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert draw_neighbourhood(settings, "Thomas Edison", 1, 2, out)["nodes"] == 2  # the limit
    with pytest.raises(NotFoundError, match="Zqxjv"):
        draw_neighbourhood(settings, "Nowhere Zqxjv", 1, 30, out)


def test_drawing_without_matplotlib_names_the_extra_to_install(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it imports
    with pytest.raises(ConfigError, match=r"riverbed\[bench\]"):
        draw_neighbourhood(settings, "Thomas Edison", 1, 30, tmp_path / "g.png")


def test_a_drawn_neighbourhood_prefers_the_best_supported_relations_to_hubs() -> None:
    g = nx.MultiDiGraph()

    def node(key: str) -> None:
        g.add_node(key, names=Counter({key.title(): 1}), labels=Counter(), chunks=Counter(), titled=Counter())

    def edge(a: str, b: str, label: str, *chunks: str) -> None:
        node(a), node(b)
        g.add_edge(a, b, key=label, evidence=Counter((c, 0, 1) for c in chunks))

    edge("tesla", "westinghouse", "hire", "a#0", "b#0", "c#0")  # three chunks say it
    edge("tesla", "america", "co_occurs", "d#0")  # one chunk; america is a hub
    for i in range(20):
        edge("america", f"place {i}", "co_occurs", f"p{i}#0")
    edge("westinghouse", "pittsburgh", "base in", "e#0")
    tree = neighbourhood_tree(g, "tesla", hops=2, limit=3)
    assert dict(tree.nodes(data="distance")) == {"tesla": 0, "westinghouse": 1, "pittsburgh": 2}
    assert tree.edges["tesla", "westinghouse"]["relations"] == {"hire"}
    assert len(neighbourhood_tree(g, "tesla", hops=2, limit=30)) == 24  # everything within 2 hops


def test_a_drawn_entity_s_distance_is_its_hop_count_not_the_layer_that_reached_it() -> None:
    """Tesla's neighbours are westinghouse and edison; with room for one of them, the second hop
    must not draw edison (one hop from tesla) as two hops away through westinghouse."""
    g = nx.MultiDiGraph()
    for key in ("tesla", "westinghouse", "edison", "pittsburgh"):
        g.add_node(key, names=Counter({key.title(): 1}), labels=Counter(), chunks=Counter(), titled=Counter())
    for a, b, chunks in (("tesla", "westinghouse", 3), ("tesla", "edison", 1), ("westinghouse", "edison", 5),
                         ("westinghouse", "pittsburgh", 1)):  # fmt: skip
        g.add_edge(a, b, key="co_occurs", evidence=Counter((f"c{i}#0", 0, 1) for i in range(chunks)))
    tree = neighbourhood_tree(g, "tesla", hops=2, limit=3)
    assert dict(tree.nodes(data="distance")) == {"tesla": 0, "westinghouse": 1, "pittsburgh": 2}
    full = neighbourhood_tree(g, "tesla", hops=2, limit=10)
    assert dict(full.nodes(data="distance")) == {"tesla": 0, "westinghouse": 1, "edison": 1, "pittsburgh": 2}
