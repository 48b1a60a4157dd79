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
from schemas.errors import IndexUnavailableError, NotFoundError
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


def graph_stats(settings: Settings, top: int = 10) -> dict[str, Any]:
    """``entities``, ``edges``, ``relations_by_label``, ``mentions``, ``chunks`` (with facts),
    ``documents``, ``edges_per_chunk``, ``per_shard`` and the ``top`` entities by degree."""
    graph, figures = read_graph(settings)
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
    ``limit`` entities within ``hops`` of it to the PNG ``out``; what was drawn. NotFoundError when
    the graph has no such entity."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    graph, _ = read_graph(settings)
    key = entity_key(name)
    if key not in graph:
        key = next((k for k, names in graph.nodes(data="names") if name in (names or ())), "")
    if not key:
        raise NotFoundError(f"no entity named {name!r} in the knowledge graph of {settings.index.name!r}")
    part = q.subgraph(graph, key, hops, limit)
    drawn = nx.Graph()
    for node in part["nodes"]:
        drawn.add_node(node["key"], name=node["name"], distance=node["distance"])
    labels: dict[tuple[str, str], set[str]] = {}
    for edge in part["edges"]:
        a, b = sorted((edge["source"], edge["target"]))
        drawn.add_edge(a, b)
        labels.setdefault((a, b), set()).add(edge["relation"])
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
    # a verb says more than co_occurs: verbs first, two at most
    edge_labels = {
        pair: ", ".join(sorted(r, key=lambda x: (x == CO_OCCURS, x))[:2]) for pair, r in labels.items()
    }
    nx.draw_networkx_edge_labels(drawn, layout, edge_labels, ax=ax, font_size=6, alpha=0.8)
    ax.set_title(f"{part['nodes'][0]['name']}: {hops}-hop neighbourhood ({len(part['nodes'])} entities)")
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
