"""How well the knowledge graph joins the passages a multi-passage question needs.

For a question with two or more relevant passages (HotpotQA's supporting paragraphs), each
passage's *entities* are those its chunks mention (its title among them). The question's passages
are **linked within h hops** when, for every pair of them, some entity of one lies within ``h``
hops (edge direction ignored) of some entity of the other:

- ``h = 0``: the two passages share an entity (a bridge question's bridge: the entity the first
  passage names and the second is about);
- ``h = 1``, ``h = 2``: joined through one or two relations.

The share of such questions is reported per ``h``, over every multi-passage question and over
those of each ``type`` the queries give (``bridge``, ``comparison``). Hubs join almost anything
within two hops, so ``h = 0`` is the figure that says the graph holds the link a question needs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from itertools import combinations
from typing import Any

import networkx as nx

HOPS = (0, 1, 2)


def passage_entities(graph: nx.MultiDiGraph) -> dict[str, set[str]]:
    """``{document id: the entities its chunks mention}`` (chunk ids are ``<document id>#<n>``)."""
    out: dict[str, set[str]] = defaultdict(set)
    for key, chunks in graph.nodes(data="chunks"):
        for chunk_id in chunks or ():
            out[chunk_id.rsplit("#", 1)[0]].add(key)
    return out


def link_distance(undirected: nx.Graph, a: set[str], b: set[str], cutoff: int) -> int | None:
    """The fewest hops from an entity of ``a`` to one of ``b`` (None: more than ``cutoff``)."""
    if a & b:
        return 0
    frontier, seen = {n for n in a if n in undirected}, set(a)
    for hops in range(1, cutoff + 1):
        frontier = {n for f in frontier for n in undirected[f]} - seen
        if frontier & b:
            return hops
        seen |= frontier
    return None


def linkage(
    graph: nx.MultiDiGraph,
    qrels: Mapping[str, Mapping[str, int]],
    types: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Per question type (``all`` and each of ``types``): ``questions`` (with two relevant
    passages or more) and ``linked@h``, the share linked within ``h`` hops (see the module)."""
    entities = passage_entities(graph)
    undirected = nx.Graph(graph.to_undirected(as_view=True))
    cutoff = max(HOPS)
    groups: dict[str, list[int | None]] = defaultdict(list)
    for qid, rels in qrels.items():
        relevant = sorted(d for d, grade in rels.items() if grade > 0)
        if len(relevant) < 2:
            continue
        worst: int | None = 0
        for a, b in combinations(relevant, 2):
            d = link_distance(undirected, entities.get(a, set()), entities.get(b, set()), cutoff)
            worst = None if d is None or worst is None else max(worst, d)
        groups["all"].append(worst)
        if types and qid in types:
            groups[types[qid]].append(worst)
    return {
        name: {
            "questions": len(found),
            **{
                f"linked@{h}": round(sum(d is not None and d <= h for d in found) / len(found), 3)
                for h in HOPS
            },
        }
        for name, found in sorted(groups.items())
    }
