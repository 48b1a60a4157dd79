"""Searcher: one query → every shard → merged top k (vector, keyword) or fused (hybrid).

The plain logic behind the Retriever deployment, kept free of Ray so it can be tested in
process: it reaches shards through the :class:`Shards` protocol, implemented over Ray actor
handles by ``deployments/retriever.py`` and over in-process :class:`actors.index_shard.IndexShard`
objects by :class:`LocalShards` (unit tests, in-process benchmarks).

Filters are checked against the metadata fields the index holds: a field no chunk has is almost
always a typo, so it is refused (:class:`InvalidRequestError` naming the field and the known ones)
instead of silently matching nothing. The known fields are cached; a filter naming a field the
cache does not know re-reads every shard's fields, but at most once per ``fields_ttl_s`` (however
many such requests arrive, concurrently or not), so a stream of typos costs one round trip per
shard per ``fields_ttl_s``. A field ingested a moment ago is therefore accepted at the latest
``fields_ttl_s`` after the cache was last read.

A searcher serves one index: the passages (``modality`` text) or an index's images (``image``);
its results say which (:attr:`Ranked.modality`). Searching both at once is
:class:`deployments.modal_searcher.ModalSearcher`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import networkx as nx
import numpy as np

from actors.index_shard import IndexShard
from actors.vector_index import ChunkRecord, Hit
from deployments.fusion import Ranked, fuse, merge_shards, ranked_keyword, ranked_vector
from deployments.graph_retrieval import fuse_graph, graph_ranking
from schemas.api import Modality
from schemas.envelope import IMAGE_METADATA_KEYS
from schemas.errors import InvalidRequestError
from schemas.filters import MetadataFilter
from schemas.settings import SearchConfig
from schemas.topology import SEARCH_MODES


class Shards(Protocol):
    """Every shard of one index. Each method asks all shards and returns one result per shard."""

    async def search(
        self, vectors: np.ndarray, k: int, filter: MetadataFilter | None
    ) -> list[list[list[Hit]]]:
        """Per shard: one best-first hit list per row of ``vectors``."""
        ...

    async def keyword_search(
        self, queries: list[str], k: int, filter: MetadataFilter | None, title_weight: float
    ) -> list[list[list[Hit]]]: ...

    async def metadata_fields(self) -> list[set[str]]: ...

    async def get(self, chunk_ids: list[str]) -> list[ChunkRecord | None]:
        """Each chunk's record (None: no shard holds it)."""
        ...


class GraphSource(Protocol):
    """The knowledge graph as graph mode asks it (:class:`deployments.graph.GraphReader`)."""

    async def link(self, question: str) -> list[str]: ...

    async def expand(self, seeds: list[str], hops: int) -> nx.MultiDiGraph: ...


class PassageScorer(Protocol):
    """A reranker (:class:`actors.reranker.Reranker`): scores each query's passages together."""

    def score_many(
        self, queries: Sequence[str], passages: Sequence[Sequence[tuple[str | None, str]]]
    ) -> list[np.ndarray]: ...


class LocalShards:
    """:class:`Shards` over in-process shards (same answers as the actors, without Ray)."""

    def __init__(self, shards: Sequence[IndexShard]) -> None:
        self.shards = list(shards)

    async def search(
        self, vectors: np.ndarray, k: int, filter: MetadataFilter | None
    ) -> list[list[list[Hit]]]:
        return [s.search(vectors, k, filter) for s in self.shards]

    async def keyword_search(
        self, queries: list[str], k: int, filter: MetadataFilter | None, title_weight: float
    ) -> list[list[list[Hit]]]:
        return [s.keyword_search(queries, k, filter, title_weight) for s in self.shards]

    async def metadata_fields(self) -> list[set[str]]:
        return [s.metadata_fields() for s in self.shards]

    async def documents(self, document_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
        return [s.documents(document_ids) for s in self.shards]

    async def get(self, chunk_ids: list[str]) -> list[ChunkRecord | None]:
        return first_found([s.get(chunk_ids) for s in self.shards])


def first_found(per_shard: Sequence[Sequence[ChunkRecord | None]]) -> list[ChunkRecord | None]:
    """Per chunk, the record of the shard that holds it (each chunk lives on one)."""
    return [next((r for r in found if r is not None), None) for found in zip(*per_shard, strict=True)]


class Searcher:
    """Searches an index through ``shards``. Safe for concurrent use from one event loop."""

    def __init__(
        self,
        config: SearchConfig,
        shards: Shards,
        fields_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        modality: Modality = "text",
        graph: GraphSource | None = None,
        reranker: PassageScorer | None = None,
    ) -> None:
        self.config = config
        self.shards = shards
        self.graph = graph
        self.reranker = reranker if config.rerank and modality == "text" else None
        self.modality: Modality = modality
        self.fields_ttl_s = fields_ttl_s
        self._clock = clock
        self._fields: set[str] = set()
        self._fields_at = -float("inf")  # when the shards' fields were last read (clock seconds)
        self._fields_lock = asyncio.Lock()

    async def check_filter(self, filter: MetadataFilter | None) -> None:
        """Raises :class:`InvalidRequestError` naming a filter field that no chunk of the index has.

        Fields the cache knows cost nothing; a field it does not know triggers
        :meth:`refresh_fields` (rate-limited), so a field ingested after the cache was read is
        accepted once a refresh has seen it."""
        if filter is None or not filter.conditions:
            return
        unknown = filter.fields - self._fields
        if unknown:
            unknown = filter.fields - await self.refresh_fields()
        if unknown:
            raise unknown_field(unknown, self._fields)

    @property
    def known_fields(self) -> set[str]:
        """The metadata fields as last read (possibly stale: see :meth:`refresh_fields`)."""
        return self._fields

    async def refresh_fields(self) -> set[str]:
        """Every shard's metadata fields, re-read only when the cache is at least ``fields_ttl_s``
        old: at most one round trip per shard per ``fields_ttl_s``. Concurrent callers share one
        read (the others wait for it and then find the cache fresh). A failed read leaves the
        cache as it was and raises the shards' error."""
        async with self._fields_lock:
            if self._clock() - self._fields_at >= self.fields_ttl_s:
                self._fields = set().union(*await self.shards.metadata_fields())
                if self.modality == "image":  # where an image came from and its thumbnail
                    self._fields -= set(IMAGE_METADATA_KEYS)
                self._fields_at = self._clock()
        return self._fields

    async def search(
        self,
        query: str,
        vector: np.ndarray | None,
        k: int,
        filter: MetadataFilter | None = None,
        mode: str = "hybrid",
    ) -> list[Ranked]:
        """The top ``k`` for ``query`` (``vector``: its embedding, needed unless ``mode`` is
        keyword), best first. See :meth:`search_many`."""
        vectors = None if vector is None else vector.reshape(1, -1)
        return (await self.search_many([query], vectors, k, filter, mode))[0]

    async def search_many(
        self,
        queries: Sequence[str],
        vectors: np.ndarray | None,
        k: int,
        filter: MetadataFilter | None = None,
        mode: str = "hybrid",
        *,
        check_filter: bool = True,
        rerank: bool = True,
    ) -> list[list[Ranked]]:
        """The top ``k`` for each query (row ``i`` of ``vectors`` is query ``i``'s embedding),
        best first, with ONE call per shard for the whole list and mode. Vector and keyword
        searches of hybrid queries run concurrently; each contributes ``max(k, config.candidates)``
        candidates to the fusion. ``check_filter=False``: the caller has checked the filter's
        fields (against several indexes: a field only the other one has matches nothing here).

        With a reranker (``config.rerank``, text only; ``rerank=False`` skips it), each query's
        best ``config.rerank_candidates`` are reordered: the cross-encoder scores them
        (``rerank_score``) and its ranking is fused with retrieval's by reciprocal rank
        (``rerank_weight`` to 1, offset ``rerank_rrf_k``), which gives their ``score``; hits past
        them keep their order, after them."""
        if check_filter:
            await self.check_filter(filter)
        reranker = self.reranker if rerank else None
        fetch = max(k, self.config.rerank_candidates) if reranker is not None else k
        results = await self._search_many(queries, vectors, fetch, filter, mode)
        if reranker is not None:
            results = await self._rerank(reranker, queries, results, k)
        if self.modality != "text":
            results = [[dataclasses.replace(r, modality=self.modality) for r in ranked] for ranked in results]
        return results

    async def _rerank(
        self, reranker: PassageScorer, queries: Sequence[str], results: list[list[Ranked]], k: int
    ) -> list[list[Ranked]]:
        """Each query's first ``rerank_candidates`` reordered by ``reranker`` (one call for all
        queries, on a worker thread: it is CPU-bound), then the rest, cut to ``k``."""
        n = self.config.rerank_candidates
        heads = [ranked[:n] for ranked in results]
        scores = await asyncio.to_thread(
            reranker.score_many, list(queries), [[(r.hit.title, r.hit.text) for r in head] for head in heads]
        )
        c = self.config
        out = []
        for ranked, head, scored in zip(results, heads, scores, strict=True):
            by_model = sorted(range(len(head)), key=lambda i: -float(scored[i]))  # stable: ties keep rank
            model_rank = {i: rank for rank, i in enumerate(by_model, 1)}
            fused = [
                c.rerank_weight / (c.rerank_rrf_k + model_rank[i]) + 1 / (c.rerank_rrf_k + i + 1)
                for i in range(len(head))
            ]
            order = sorted(range(len(head)), key=lambda i: -fused[i])
            top = [replace(head[i], score=fused[i], rerank_score=float(scored[i])) for i in order]
            out.append((top + ranked[n:])[:k])
        return out

    async def _search_many(
        self,
        queries: Sequence[str],
        vectors: np.ndarray | None,
        k: int,
        filter: MetadataFilter | None,
        mode: str,
    ) -> list[list[Ranked]]:
        if mode not in SEARCH_MODES:
            raise InvalidRequestError(f"unknown mode {mode!r}: use {', '.join(SEARCH_MODES)}", param="mode")
        if mode == "graph" and self.modality != "text":
            mode = "hybrid"  # images have no graph: graph mode searches them as hybrid
        if mode == "graph" and vectors is not None and len(vectors) == len(queries):
            return await self._graph_mode(queries, vectors, k, filter)
        if mode == "keyword":
            return [ranked_keyword(hits) for hits in await self._keyword(list(queries), k, filter)]
        if vectors is None or len(vectors) != len(queries):
            raise InvalidRequestError(f"mode {mode!r} needs the query's vector", param="mode")
        if mode == "vector":
            return [ranked_vector(hits) for hits in await self._vector(vectors, k, filter)]
        n = max(k, self.config.candidates)
        vector_hits, keyword_hits = await asyncio.gather(
            self._vector(vectors, n, filter), self._keyword(list(queries), n, filter)
        )
        c = self.config
        return [
            fuse(v, kw, k, c.rrf_k, c.vector_weight, c.keyword_weight)
            for v, kw in zip(vector_hits, keyword_hits, strict=True)
        ]

    async def _graph_mode(
        self, queries: Sequence[str], vectors: np.ndarray, k: int, filter: MetadataFilter | None
    ) -> list[list[Ranked]]:
        """Hybrid's ``max(k, candidates)``, with the graph's ranking of each query fused in
        (:mod:`deployments.graph_retrieval`)."""
        if self.graph is None:
            raise InvalidRequestError(
                "mode 'graph' needs the index's knowledge graph, which this app does not serve: "
                "serve with graph.enabled (--set graph.enabled=true)",
                param="mode",
            )
        n = max(k, self.config.candidates)
        hybrid = await self._search_many(queries, vectors, n, filter, "hybrid")
        return list(
            await asyncio.gather(
                *(
                    self._with_graph(q, vectors[i], ranked, k, n, filter)
                    for i, (q, ranked) in enumerate(zip(queries, hybrid, strict=True))
                )
            )
        )

    async def _with_graph(
        self,
        query: str,
        vector: np.ndarray,
        hybrid: list[Ranked],
        k: int,
        n: int,
        filter: MetadataFilter | None,
    ) -> list[Ranked]:
        assert self.graph is not None
        c = self.config
        seeds = await self.graph.link(query)
        if not seeds:
            return hybrid[:k]
        local = await self.graph.expand(seeds, 1)
        candidates = graph_ranking(local, seeds, hybrid, c.rrf_k, n, limit=n)
        found = {r.hit.chunk_id for r in hybrid}
        missing = [g.chunk_id for g in candidates if g.chunk_id not in found]
        extra: dict[str, Ranked] = {}
        for record in await self.shards.get(missing) if missing else []:
            if record is None or (filter is not None and not filter.matches(record.metadata)):
                continue
            hit = Hit(record.chunk_id, record.document_id, record.number, record.text, record.title,
                      record.start, record.end, record.metadata, float(vector @ record.vector),
                      record.alignment)  # fmt: skip
            extra[hit.chunk_id] = Ranked(hit, 0.0, vector_score=hit.score)
        return fuse_graph(hybrid, candidates, extra, k, c.rrf_k, c.graph_weight)

    async def _vector(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None) -> list[list[Hit]]:
        per_shard = await self.shards.search(np.ascontiguousarray(vectors, dtype=np.float32), k, filter)
        return [merge_shards([rows[i] for rows in per_shard], k) for i in range(len(vectors))]

    async def _keyword(self, queries: list[str], k: int, filter: MetadataFilter | None) -> list[list[Hit]]:
        per_shard = await self.shards.keyword_search(queries, k, filter, self.config.title_weight)
        return [merge_shards([rows[i] for rows in per_shard], k) for i in range(len(queries))]


def unknown_field(unknown: Iterable[str], known: Iterable[str]) -> InvalidRequestError:
    """The 400 for a filter naming a field that no chunk has (the first of ``unknown``)."""
    listed = ", ".join(sorted(known)) or "none: no chunk has metadata"
    return InvalidRequestError(
        f"unknown filter field {sorted(unknown)[0]!r}; the index has: {listed}", param="filter"
    )
