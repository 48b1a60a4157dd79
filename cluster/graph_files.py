"""`riverbed graph stats`, `riverbed graph export` and `riverbed graph draw`: an index's knowledge
graph read from its graph shards' stores (read-only: it works while the shard actors run, and when
nothing runs).

The shards are merged into one graph (:func:`actors.graph_query.merge`). Exported, each node has
``name`` (its most frequent name), ``label``, ``aliases`` and ``mentions``; each edge (one per
source, target and relation) has ``relation``, ``weight`` (the chunks stating it) and ``chunks``
(their ids). GraphML takes scalars only, so lists are written as JSON text there. Drawn, an
entity's neighbourhood is a PNG: the entities nearest it (the most connected first), each edge
labelled with its relations.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import networkx as nx

from actors import graph_query as q
from actors.graph_extract import CO_OCCURS, entity_key
from actors.graph_store import GraphStore
from schemas.errors import ConfigError, IndexUnavailableError, NotFoundError
from schemas.settings import Settings
from schemas.topology import shard_directory

ExportFormat = Literal["graphml", "json"]


def read_graph(settings: Settings) -> tuple[nx.MultiDiGraph, list[dict[str, int]]]:
    """The index's whole knowledge graph, and each shard's figures. IndexUnavailableError naming
    the index when it has no graph (graph.enabled was never on for an ingest of it)."""
    side = settings.graph_side()
    parts, figures = [], []
    for shard in range(side.index.n_shards):
        store = GraphStore.read_only(shard_directory(side.data_dir, shard))
        try:
            parts.append(store.graph)
            figures.append(store.stats())
        finally:
            store.close()
    if not parts:
        raise IndexUnavailableError(f"index {settings.index.name!r} has no knowledge graph")
    return q.merge(parts), figures


def graph_stats(
    settings: Settings, top: int = 10, read: tuple[nx.MultiDiGraph, list[dict[str, int]]] | None = None
) -> dict[str, Any]:
    """``entities``, ``edges``, ``relations_by_label``, ``mentions``, ``chunks`` (with facts),
    ``documents``, ``edges_per_chunk``, ``per_shard`` and the ``top`` entities by degree; of
    ``read`` (what :func:`read_graph` returned) when the caller has it."""
    graph, figures = read if read is not None else read_graph(settings)
    entities = [k for k, chunks in graph.nodes(data="chunks") if chunks]
    chunks = {c for _, node_chunks in graph.nodes(data="chunks") for c in node_chunks}
    by_label = Counter(label for _, _, label in graph.edges(keys=True))
    ranked = sorted(entities, key=lambda k: (-q.degree(graph, k), k))[:top]
    return {
        "index": settings.index.name,
        "entities": len(entities),
        "edges": graph.number_of_edges(),
        "relations_by_label": dict(by_label.most_common(20)),
        "mentions": sum(f["mentions"] for f in figures),
        "chunks": len(chunks),
        "documents": sum(f["documents"] for f in figures),
        "edges_per_chunk": round(graph.number_of_edges() / len(chunks), 2) if chunks else 0.0,
        "per_shard": figures,
        "top_entities": [q.entity_summary(graph, k) for k in ranked],
    }


def export_graph(settings: Settings, fmt: ExportFormat, out: Path) -> dict[str, int]:
    """Writes the graph to ``out`` as GraphML or node-link JSON; its node and edge counts."""
    graph, _ = read_graph(settings)
    plain = nx.MultiDiGraph()
    for key in graph.nodes:
        summary = q.entity_summary(graph, key)
        plain.add_node(key, name=summary["name"], label=summary["label"] or "",
                       aliases=summary["aliases"], mentions=summary["mentions"])  # fmt: skip
    for a, b, label, data in graph.edges(keys=True, data=True):
        chunks = sorted({c for c, _, _ in data["evidence"]})
        plain.add_edge(a, b, key=label, relation=label, weight=len(chunks), chunks=chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "graphml":
        for _, data in plain.nodes(data=True):
            data["aliases"] = json.dumps(data["aliases"], ensure_ascii=False)
        for _, _, data in plain.edges(data=True):
            data["chunks"] = json.dumps(data["chunks"], ensure_ascii=False)
        nx.write_graphml(plain, out)
    else:
        out.write_text(
            json.dumps(nx.node_link_data(plain, edges="edges"), ensure_ascii=False), encoding="utf-8"
        )
    return {"nodes": plain.number_of_nodes(), "edges": plain.number_of_edges()}


def draw_neighbourhood(settings: Settings, name: str, hops: int, limit: int, out: Path) -> dict[str, Any]:
    """Draws the entity ``name`` (a key, or a name some mention is written as) and at most
    ``limit`` entities within ``hops`` of it to the PNG ``out`` (:func:`neighbourhood_tree`); what
    was drawn. NotFoundError when the graph has no such entity; ConfigError naming the extra to
    install when matplotlib is not there (the ``bench`` extra brings it)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(
            "drawing the graph needs matplotlib, which the 'bench' extra installs: "
            "pip install 'riverbed[bench]' (or pip install matplotlib)"
        ) from exc

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    graph, _ = read_graph(settings)
    key = entity_key(name)
    if key not in graph:
        named = (k for k, names in graph.nodes(data="names") if key in map(entity_key, names or ()))
        key = next(named, "")
    if not key:
        raise NotFoundError(f"no entity named {name!r} in the knowledge graph of {settings.index.name!r}")
    drawn = neighbourhood_tree(graph, key, hops, limit)
    labels = {(a, b): relations for a, b, relations in drawn.edges(data="relations")}
    layout = nx.spring_layout(drawn, seed=0, k=1.6 / max(1, drawn.number_of_nodes()) ** 0.5)
    colours = ["tab:red", "tab:orange", "tab:blue", "tab:gray"]
    fig, ax = plt.subplots(figsize=(11, 8), dpi=110)
    nx.draw_networkx_edges(drawn, layout, ax=ax, alpha=0.35)
    nx.draw_networkx_nodes(
        drawn,
        layout,
        ax=ax,
        node_size=[900 if d == 0 else 260 for _, d in drawn.nodes(data="distance")],
        node_color=[colours[min(d, 3)] for _, d in drawn.nodes(data="distance")],
    )
    nx.draw_networkx_labels(drawn, layout, {k: n for k, n in drawn.nodes(data="name")}, ax=ax, font_size=8)
    # a verb or `mentions` says more than co_occurs: co_occurs last, two labels at most
    edge_labels = {
        pair: ", ".join(sorted(r, key=lambda x: (x == CO_OCCURS, x))[:2]) for pair, r in labels.items()
    }
    nx.draw_networkx_edge_labels(drawn, layout, edge_labels, ax=ax, font_size=6, alpha=0.8)
    title = drawn.nodes[key]["name"]
    count = drawn.number_of_nodes()
    ax.set_title(f"{title}: {hops}-hop neighbourhood ({count} entities, the best supported)")
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {
        "entity": key,
        "nodes": drawn.number_of_nodes(),
        "edges": drawn.number_of_edges(),
        "path": str(out),
    }


def neighbourhood_tree(graph: nx.MultiDiGraph, key: str, hops: int, limit: int) -> nx.Graph:
    """A readable part of ``key``'s neighbourhood: hop by hop, each reached entity's neighbours by
    how many chunks state their relations (ties: the less connected, the more specific), a fair
    share per entity (what one does not use goes to the next), at most ``limit`` in all; the
    relations joining them as edge ``relations`` (a set of labels; between layers, or within the
    first) and each node's ``name`` (its key where two drawn entities share a name) and
    ``distance``. Hubs such as a country reach everything; ranking by support, not by degree,
    keeps the picture about ``key``. Hop ``d`` draws only entities ``d`` hops from ``key`` (the
    fewest relations between them, either way), so a node's ``distance`` is its true one."""
    hops_from = nx.single_source_shortest_path_length(graph.to_undirected(as_view=True), key, cutoff=hops)
    tree = nx.Graph()

    def add(node: str, distance: int) -> None:
        tree.add_node(node, name=q.entity_summary(graph, node)["name"], distance=distance)

    add(key, 0)
    layer = [key]
    for distance in range(1, hops + 1):
        room = limit - tree.number_of_nodes()
        if room <= 0 or not layer:
            break
        budget = max(1, room // (hops - distance + 1))  # the room left, split over the hops left
        stop = tree.number_of_nodes() + budget
        nxt: list[str] = []
        for i, node in enumerate(layer):
            share = -(-(stop - tree.number_of_nodes()) // (len(layer) - i))  # what others left over

            support: Counter[str] = Counter()
            for a, b, _, data in [*graph.out_edges(node, keys=True, data=True),
                                  *graph.in_edges(node, keys=True, data=True)]:  # fmt: skip
                other = b if a == node else a
                if other not in tree and hops_from[other] == distance:
                    support[other] += len({c for c, _, _ in data["evidence"]})
            ranked = sorted(support, key=lambda k: (-support[k], q.degree(graph, k), k))
            for other in ranked[:share]:
                add(other, distance)
                nxt.append(other)
        layer = nxt
    names = Counter(name for _, name in tree.nodes(data="name"))
    for node, name in list(tree.nodes(data="name")):
        if names[name] > 1:
            tree.nodes[node]["name"] = node
    depth = dict(tree.nodes(data="distance"))
    for a, b, label in graph.edges(keys=True):
        # between layers, or within the first: edges among the far entities are clutter
        if a in tree and b in tree and a != b and (depth[a] != depth[b] or depth[a] == 1):
            if not tree.has_edge(a, b):
                tree.add_edge(a, b, relations=set())
            tree.edges[a, b]["relations"].add(label)
    return tree
