"""Graph-augmented retrieval (``mode: "graph"``): hybrid search, fused with the chunks the knowledge
graph finds around the entities a query names. Pure functions; the searcher gathers their inputs.

For one query (:func:`graph_ranking`):

1. the query's entities (the *seeds*, linked by :func:`actors.graph_query.link`) and the graph
   within one hop of them;
2. a seed's *specificity* is one over the number of chunks that mention it (a name few passages
   use says more about which passages a question wants than "American" does); each chunk that
   mentions a seed scores the seed's specificity;
3. each neighbour of a seed is weighed by how well the hybrid search ranked the chunks that state
   its relation to the seed (its *evidence*): ``Σ 1 / (rrf_k + hybrid rank)`` over those chunks,
   ``1 / (rrf_k + candidates)`` for one hybrid did not return, times the seed's specificity; each
   chunk mentioning a neighbour
   scores that weight times ``rrf_k``, twice for a chunk whose document the neighbour is the title
   of (the passage *about* the bridge entity: what a second hop of a multi-hop question needs);
4. the chunks on evidence paths (of a seed's relations) score their weight once more.

The chunks by score (ties: the better hybrid rank, then chunk id: a seed's chunks, all scored
alike, stay in hybrid's order) are the graph's ranking, fused with hybrid's by rank
(:func:`fuse_graph`: ``1 / (rrf_k + hybrid rank) + graph_weight / (rrf_k + graph rank)``). Each
chunk keeps the entities that brought it in (for ``explain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import networkx as nx

from deployments.fusion import Ranked


@dataclass(frozen=True)
class GraphCandidate:
    chunk_id: str
    score: float
    entities: tuple[str, ...]
    """The seeds and neighbours that brought the chunk in, the strongest first."""


def graph_ranking(
    graph: nx.MultiDiGraph,
    seeds: Sequence[str],
    hybrid: Sequence[Ranked],
    rrf_k: float,
    candidates: int,
    limit: int,
) -> list[GraphCandidate]:
    """The chunks the graph finds for a query (see the module docstring), best first, at most
    ``limit``. ``graph``: the graph within one hop of ``seeds``; ``hybrid``: the query's hybrid
    ranking (``candidates`` long at most)."""
    rank = {r.hit.chunk_id: i for i, r in enumerate(hybrid, 1)}
    floor = 1.0 / (rrf_k + candidates + 1)
    scores: dict[str, float] = {}
    why: dict[str, dict[str, float]] = {}

    def add(chunk_id: str, score: float, entity: str) -> None:
        scores[chunk_id] = scores.get(chunk_id, 0.0) + score
        reasons = why.setdefault(chunk_id, {})
        reasons[entity] = reasons.get(entity, 0.0) + score

    present = [s for s in seeds if s in graph]
    specificity = {s: 1.0 / max(1, len(graph.nodes[s]["chunks"])) for s in present}
    for seed in present:
        for chunk_id in graph.nodes[seed]["chunks"]:
            add(chunk_id, specificity[seed], seed)
    weights: dict[str, float] = {}
    evidence: dict[str, set[str]] = {}
    for seed in present:
        for a, b, _, data in [*graph.out_edges(seed, keys=True, data=True),
                              *graph.in_edges(seed, keys=True, data=True)]:  # fmt: skip
            other = b if a == seed else a
            if other in present:
                continue
            chunks = {c for c, _, _ in data["evidence"]}
            weights[other] = weights.get(other, 0.0) + specificity[seed] * sum(
                1.0 / (rrf_k + rank[c]) if c in rank else floor for c in chunks
            )
            evidence.setdefault(other, set()).update(chunks)
    for neighbour, weight in weights.items():
        node = graph.nodes[neighbour]
        titled = _titled_chunks(graph, neighbour)
        for chunk_id in node["chunks"]:
            add(chunk_id, weight * rrf_k * (2.0 if chunk_id in titled else 1.0), neighbour)
        for chunk_id in evidence[neighbour]:
            add(chunk_id, weight, neighbour)
    never = len(hybrid) + 1
    order = sorted(scores, key=lambda c: (-scores[c], rank.get(c, never), c))[:limit]
    return [GraphCandidate(c, scores[c], tuple(sorted(why[c], key=lambda e: (-why[c][e], e)))) for c in order]


def fuse_graph(
    hybrid: Sequence[Ranked],
    graph: Sequence[GraphCandidate],
    extra: dict[str, Ranked],
    k: int,
    rrf_k: float,
    graph_weight: float,
) -> list[Ranked]:
    """Reciprocal rank fusion of the hybrid ranking and the graph's: ``1 / (rrf_k + hybrid rank)
    + graph_weight / (rrf_k + graph rank)`` over the lists holding the chunk (``extra`` holds the
    hits of the chunks only the graph found). The top ``k``, best first (ties: the better hybrid
    rank, then chunk id)."""
    never = float("inf")
    hybrid_rank = {r.hit.chunk_id: i for i, r in enumerate(hybrid, 1)}
    fused: dict[str, Ranked] = {}
    for chunk_id, rank in hybrid_rank.items():
        r = hybrid[rank - 1]
        fused[chunk_id] = replace(r, score=1.0 / (rrf_k + rank), fused_score=1.0 / (rrf_k + rank))
    for g_rank, candidate in enumerate(graph, 1):
        base = fused.get(candidate.chunk_id) or extra.get(candidate.chunk_id)
        if base is None:  # not in the index now (deleted since), or refused by the filter
            continue
        own = 1.0 / (rrf_k + hybrid_rank[candidate.chunk_id]) if candidate.chunk_id in hybrid_rank else 0.0
        score = own + graph_weight / (rrf_k + g_rank)
        fused[candidate.chunk_id] = replace(
            base, score=score, fused_score=score, graph_rank=g_rank, graph_entities=candidate.entities
        )
    order = sorted(
        fused.values(), key=lambda r: (-r.score, hybrid_rank.get(r.hit.chunk_id, never), r.hit.chunk_id)
    )
    return order[:k]


def _titled_chunks(graph: nx.MultiDiGraph, key: str) -> set[str]:
    """The chunks of the documents whose title is ``key``."""
    return set(graph.nodes[key].get("titled", ()))
