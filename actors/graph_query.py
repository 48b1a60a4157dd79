"""Graph queries over the knowledge graph's view: entity search, an entity and its neighbours,
the neighbourhood of an entity within some hops, the shortest paths between two entities, and the
entities a question names.

Every query works on a ``networkx.MultiDiGraph`` in the graph shards' form (see
:mod:`actors.graph_store`: nodes with ``names``, ``labels``, ``chunks`` and ``titled`` Counters,
edges keyed by label with an ``evidence`` Counter of ``(chunk_id, sentence start, sentence end)``).
With one shard that is the shard's own view; with several, :func:`merge` joins what each returned
(an entity's mentions live on its shard, its edges on the shards of both ends), and :func:`expand`
grows the part of the graph a query needs hop by hop, asking the shards only about the entities it
reached.

Hops and paths ignore edge direction: "A mentions B" joins B to A as much as A to B.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import islice, pairwise
from typing import Any

import networkx as nx

from actors.graph_extract import entity_key, is_entity_key

MAX_NGRAM = 6
"""Linking looks up word runs of a question up to this long."""


def merge(parts: Iterable[nx.MultiDiGraph], into: nx.MultiDiGraph | None = None) -> nx.MultiDiGraph:
    """One graph of several shards' graphs. An entity's mentions are all on its own shard, and an
    edge's evidence is the same on the shards of both its ends, so each Counter merges as the
    element-wise max (the same part fetched twice is counted once)."""
    out = nx.MultiDiGraph() if into is None else into
    for part in parts:
        for key, data in part.nodes(data=True):
            if key not in out:
                out.add_node(key, names=Counter(), labels=Counter(), chunks=Counter(), titled=Counter())
            node = out.nodes[key]
            for field in ("names", "labels", "chunks", "titled"):  # the max: one shard (its own) has them all
                node[field] |= data.get(field, Counter())
            if "degree" in data:
                node["degree"] = max(node.get("degree", 0), data["degree"])
        for a, b, label, data in part.edges(keys=True, data=True):
            if not out.has_edge(a, b, label):
                out.add_edge(a, b, key=label, evidence=Counter())
            out.edges[a, b, label]["evidence"] |= data["evidence"]
    return out


def around(graph: nx.MultiDiGraph, keys: Iterable[str]) -> nx.MultiDiGraph:
    """A copy of the nodes ``keys`` (those present) and every edge touching one, with the nodes at
    their other ends: what a shard returns for one hop of :func:`expand`. Each node copied carries
    its ``degree`` here (on its own shard, where all its edges are, its true degree)."""
    out = nx.MultiDiGraph()
    present = [k for k in keys if k in graph]
    for key in present:
        _copy_node(graph, out, key)
        for a, b, label, data in [*graph.out_edges(key, keys=True, data=True),
                                  *graph.in_edges(key, keys=True, data=True)]:  # fmt: skip
            for end in (a, b):
                if end not in out:
                    _copy_node(graph, out, end)
            out.add_edge(a, b, key=label, evidence=Counter(data["evidence"]))
    return out


def describe(graph: nx.MultiDiGraph, keys: Iterable[str]) -> nx.MultiDiGraph:
    """A copy of the nodes ``keys`` (those present), without edges, each with its ``degree``."""
    out = nx.MultiDiGraph()
    for key in keys:
        if key in graph:
            _copy_node(graph, out, key)
    return out


async def expand(
    fetch: Callable[[list[str]], Awaitable[nx.MultiDiGraph]],
    seeds: Sequence[str],
    hops: int,
    *,
    details: Callable[[list[str]], Awaitable[nx.MultiDiGraph]] | None = None,
    max_nodes: int = 5000,
) -> nx.MultiDiGraph:
    """The graph within ``hops`` of ``seeds``: ``await fetch(keys)`` returns :func:`around` of those
    keys (from every shard, merged), and ``await details(keys)`` :func:`describe` of them: the
    entities at the last hop are described by their own shards that way (their names, mentions and
    degree live there). Stops growing once ``max_nodes`` are reached (nearest first)."""
    local = nx.MultiDiGraph()
    expanded: set[str] = set()
    frontier = list(dict.fromkeys(seeds))
    for _ in range(hops):
        if not frontier:
            break
        merge([await fetch(frontier)], into=local)
        expanded.update(frontier)
        if local.number_of_nodes() >= max_nodes:
            break
        frontier = sorted({n for k in frontier if k in local for n in _neighbours(local, k)} - expanded)
    if details is not None and frontier:
        merge([await details(frontier)], into=local)
    return local


# QUERIES


def entity_summary(graph: nx.MultiDiGraph, key: str) -> dict[str, Any]:
    """``key``, ``name`` (its most frequent name), ``label`` (its most frequent label),
    ``aliases`` (its other names), ``mentions`` (how many), ``degree`` (distinct neighbours)."""
    node = graph.nodes[key]
    names: Counter[str] = node["names"]
    labels: Counter[str] = node["labels"]
    name = min(names, key=lambda n: (-names[n], -len(n), n)) if names else key
    return {
        "key": key,
        "name": name,
        "label": _top(Counter({k: v for k, v in labels.items() if k != "TITLE"})) or _top(labels),
        "aliases": sorted(set(names) - {name}),
        "mentions": sum(node["chunks"].values()),
        "degree": degree(graph, key),
    }


def search_entities(graph: nx.MultiDiGraph, prefix: str, limit: int) -> list[dict[str, Any]]:
    """Entities with a mention whose key, or a word of it, starts with ``prefix`` (normalised as a
    key): the most connected first, then by key."""
    want = entity_key(prefix)
    if not want:
        return []
    found = [
        key
        for key, chunks in graph.nodes(data="chunks")
        if chunks and (key.startswith(want) or f" {want}" in f" {key}")
    ]
    found.sort(key=lambda k: (-degree(graph, k), k))
    return [entity_summary(graph, k) for k in found[:limit]]


def neighbours(graph: nx.MultiDiGraph, key: str, limit: int) -> list[dict[str, Any]]:
    """The relations of ``key``: ``entity`` (the other end), ``relation`` (label), ``direction``
    (``out``: key -> entity), ``chunks`` (supporting chunk ids); the best supported first."""
    rows = []
    for a, b, label, data in [*graph.out_edges(key, keys=True, data=True),
                              *graph.in_edges(key, keys=True, data=True)]:  # fmt: skip
        chunks = _chunks(data["evidence"])
        other, direction = (b, "out") if a == key else (a, "in")
        rows.append({"entity": other, "relation": label, "direction": direction, "chunks": chunks})
    rows.sort(key=lambda r: (-len(r["chunks"]), r["entity"], r["relation"], r["direction"]))
    return rows[:limit]


def subgraph(graph: nx.MultiDiGraph, key: str, hops: int, limit: int) -> dict[str, Any]:
    """The entities within ``hops`` of ``key`` (at most ``limit``, nearest first, then the most
    connected), and the edges among them with their evidence: ``{"nodes": [...], "edges": [...]}``,
    each node with its ``distance``."""
    distance = nx.single_source_shortest_path_length(_undirected(graph), key, cutoff=hops)
    order = sorted(distance, key=lambda k: (distance[k], -degree(graph, k), k))[:limit]
    kept = set(order)
    nodes = [{**entity_summary(graph, k), "distance": distance[k]} for k in order]
    edges = [
        _edge(a, b, label, data)
        for a, b, label, data in graph.edges(keys=True, data=True)
        if a in kept and b in kept
    ]
    edges.sort(key=lambda e: (e["source"], e["target"], e["relation"]))
    return {"nodes": nodes, "edges": edges}


def shortest_paths(
    graph: nx.MultiDiGraph, source: str, target: str, max_hops: int, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` shortest paths (at most ``max_hops`` edges) between two entities, each a
    list of ``nodes`` and of ``steps``: the relations joining each node to the next (every label
    that does, with its evidence)."""
    undirected = _undirected(graph)
    try:
        paths = list(islice(nx.all_shortest_paths(undirected, source, target), limit))
    except nx.NetworkXNoPath:
        return []
    out = []
    for path in paths:
        if len(path) - 1 > max_hops:
            break
        steps = []
        for a, b in pairwise(path):
            between = [_edge(x, y, label, data) for x, y, label, data in _edges_between(graph, a, b)]
            steps.append(sorted(between, key=lambda e: (-len(e["chunks"]), e["relation"])))
        out.append({"nodes": path, "steps": steps})
    return out


def link_candidates(question: str, stop_words: frozenset[str] = frozenset()) -> dict[str, tuple[int, int]]:
    """The word runs of a question (up to :data:`MAX_NGRAM` words), normalised as keys, that may
    name an entity, each with its word range (its first occurrence); longest runs first. Each word
    is normalised on its own, so a possessive goes ("Tesla's" is "tesla"); a run's key drops a
    leading article, as an entity's does ("the Who" is "who"). Stop words and one-letter runs are
    never one (a run that is an article and a stop word, such as "the who", is). A question that
    capitalises a word past its first uses case to mark names: then a run must have a word it
    writes with a capital or a digit ("home" in "the Maineiacs' home games" names no entity called
    "Home")."""
    words = [word for token in question.split() for word in entity_key(token).split()]
    marked = _marked_words(question)
    candidates: dict[str, tuple[int, int]] = {}
    for n in range(min(MAX_NGRAM, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            run = " ".join(words[i : i + n])
            key = entity_key(run)
            if (
                is_entity_key(run, stop_words)
                and is_entity_key(key)
                and (marked is None or marked.intersection(words[i : i + n]))
            ):
                candidates.setdefault(key, (i, i + n))
    return candidates


def _marked_words(question: str) -> set[str] | None:
    """The words (as keys) a question writes with a capital or a digit; None when it capitalises
    no word past its first (it does not use case)."""
    tokens = question.split()
    if not any(ch.isupper() for token in tokens[1:] for ch in token):
        return None
    return {
        word
        for token in tokens
        if any(ch.isupper() or ch.isdigit() for ch in token)
        for word in entity_key(token).split()
    }


def pick_links(candidates: dict[str, tuple[int, int]], found: dict[str, str]) -> list[str]:
    """The entity keys of the candidates ``found`` (``{candidate: entity key}``: an entity's key or
    one of its names), the longest run first where runs overlap; in order of length, then place."""
    taken: set[int] = set()
    out: list[str] = []
    for run, (i, j) in sorted(candidates.items(), key=lambda c: (c[1][0] - c[1][1], c[1][0])):
        if run in found and not taken.intersection(range(i, j)):
            taken.update(range(i, j))
            if found[run] not in out:
                out.append(found[run])
    return out


def link(
    question: str, known: Callable[[list[str]], dict[str, str]], stop_words: frozenset[str] = frozenset()
) -> list[str]:
    """The entity keys a question names: :func:`link_candidates` looked up with ``known`` and
    :func:`pick_links`."""
    candidates = link_candidates(question, stop_words)
    return pick_links(candidates, known(list(candidates)))


# HELPERS


def _copy_node(graph: nx.MultiDiGraph, out: nx.MultiDiGraph, key: str) -> None:
    data = graph.nodes[key]
    out.add_node(
        key,
        names=Counter(data["names"]),
        labels=Counter(data["labels"]),
        chunks=Counter(data["chunks"]),
        titled=Counter(data["titled"]),
        degree=degree(graph, key),
    )


def degree(graph: nx.MultiDiGraph, key: str) -> int:
    """Distinct neighbours: here, or as the entity's own shard counted them (the larger)."""
    return max(len(_neighbours(graph, key)), graph.nodes[key].get("degree", 0))


def _neighbours(graph: nx.MultiDiGraph, key: str) -> set[str]:
    return (set(graph.successors(key)) | set(graph.predecessors(key))) - {key}


def _undirected(graph: nx.MultiDiGraph) -> nx.Graph:
    return nx.Graph(graph.to_undirected(as_view=True))


def _edges_between(graph: nx.MultiDiGraph, a: str, b: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    out = []
    for x, y in ((a, b), (b, a)):
        for label, data in (graph.get_edge_data(x, y) or {}).items():
            out.append((x, y, label, data))
    return out


def _edge(a: str, b: str, label: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"source": a, "target": b, "relation": label, "chunks": _chunks(data["evidence"])}


def _chunks(evidence: Counter[tuple[str, int, int]]) -> list[str]:
    return sorted({chunk_id for chunk_id, _, _ in evidence})


def _top(counter: Counter[str]) -> str | None:
    """The most frequent key (ties: the smallest)."""
    if not counter:
        return None
    return min(counter, key=lambda k: (-counter[k], k))
