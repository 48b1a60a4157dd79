"""GraphReader: the knowledge graph's queries (:mod:`actors.graph_query`) over its shard actors.

The graph lives in the index's graph side (``<index>-graph``, ``graph.n_shards`` shards; each
entity on ``shard_of(key)``, each edge on the shards of both its ends). A query fans out per hop:
the shards answer for the entities asked about (their edges and the entities at the other ends),
the reader merges the parts and asks about the next hop's entities, and the entities reached at
the last hop are described by their own shards. Names are resolved as keys first, else as a name
some mention is written as (an alias). Shard trouble raises as for the vector shards (503 naming
the shard); an entity that is not in the graph raises :class:`NotFoundError` (404).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import networkx as nx

from actors import graph_query as q
from actors.graph_extract import entity_key
from schemas.errors import NotFoundError


class Shards(Protocol):
    async def call_all(self, method: str, *args: Any) -> list[Any]: ...


class GraphReader:
    """Graph queries over ``shards`` (the graph side's shard actors, as
    :class:`deployments.retriever.RayShards`); ``stop_words`` never name an entity in a question."""

    def __init__(self, shards: Shards, stop_words: frozenset[str] = frozenset()) -> None:
        self.shards = shards
        self.stop_words = stop_words  # the extraction model's (actors.graph_extract.pipeline_stop_words)

    async def search(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        """Entities whose key or a word of it starts with ``prefix``: the most connected first."""
        parts = await self.shards.call_all("search", prefix, limit)
        found = [e for part in parts for e in part]
        found.sort(key=lambda e: (-e["degree"], e["key"]))
        return found[:limit]

    async def known(self, candidates: list[str]) -> dict[str, str]:
        """``{candidate: entity key}`` over every shard: an entity's own key before an alias."""
        out: dict[str, str] = {}
        for part in await self.shards.call_all("known", candidates):
            for candidate, key in part.items():
                if candidate not in out or key == candidate:
                    out[candidate] = key
        return out

    async def resolve(self, name: str, param: str) -> str:
        """The key of the entity ``name`` names (as a key, or as one of its names); NotFoundError
        naming ``param`` when none does."""
        key = entity_key(name)
        found = (await self.known([key])).get(key) if key else None
        if found is None:
            raise NotFoundError(f"no entity named {name!r} in the knowledge graph (key {key!r})", param)
        return found

    async def entity(self, name: str, limit: int) -> dict[str, Any]:
        """The entity, its mentions and its neighbours (at most ``limit`` of each)."""
        key = await self.resolve(name, "name")
        local = await self.expand([key], 1)
        mentions: list[dict[str, Any]] = []
        for part in await self.shards.call_all("mentions", [key], limit):
            mentions += part[key]
        mentions.sort(key=lambda m: (m["document_id"], m["span"][0], m["chunk_id"]))
        return {
            "entity": q.entity_summary(local, key),
            "mentions": mentions[:limit],
            "neighbours": q.neighbours(local, key, limit),
        }

    async def neighbourhood(self, name: str, hops: int, limit: int) -> dict[str, Any]:
        key = await self.resolve(name, "entity")
        return q.subgraph(await self.expand([key], hops), key, hops, limit)

    async def paths(self, source: str, target: str, max_hops: int, limit: int) -> list[dict[str, Any]]:
        """The shortest paths, grown from both ends (half the hops each: every path of at most
        ``max_hops`` edges lies within what the two ends reach)."""
        a = await self.resolve(source, "path.from")
        b = await self.resolve(target, "path.to")
        if a == b:
            return [{"nodes": [a], "steps": []}]
        near, far = math.ceil(max_hops / 2), max_hops // 2
        local = q.merge([await self.expand([a], near), await self.expand([b], far)])
        return q.shortest_paths(local, a, b, max_hops, limit)

    async def link(self, question: str) -> list[str]:
        """The entities a question names (:func:`actors.graph_query.link`)."""
        candidates = q.link_candidates(question, self.stop_words)
        found = await self.known(list(candidates)) if candidates else {}
        return q.pick_links(candidates, found)

    async def expand(self, seeds: list[str], hops: int) -> nx.MultiDiGraph:
        """The graph within ``hops`` of ``seeds`` (:func:`actors.graph_query.expand` over the shards)."""

        async def fetch(keys: list[str]) -> nx.MultiDiGraph:
            return q.merge(await self.shards.call_all("around", keys))

        async def details(keys: list[str]) -> nx.MultiDiGraph:
            return q.merge(await self.shards.call_all("describe", keys))

        return await q.expand(fetch, seeds, hops, details=details)
