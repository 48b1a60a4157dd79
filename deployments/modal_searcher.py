"""ModalSearcher: one query over passages (the index) and images (its images index), ranked together.

Each modality has its own :class:`deployments.searcher.Searcher` (its own shards, its own filter
fields); this class asks those the request names, concurrently, and merges their lists
(:mod:`deployments.fusion`):

- **vector, one space** (the image model's text space is the index's text embedder, so ONE query
  vector searched both indexes): by score, since the cosines compare: :func:`merge_by_score`.
- **hybrid, one space**: vector ranks over both lists, keyword ranks within each, fused as text
  alone is: :func:`fuse_in_one_space`. Each side brings its own hybrid top ``max(k, candidates)``,
  so the vector ranks are taken over the hits those kept, not over both indexes' whole vector
  lists: a hit that only its side's fusion dropped cannot come back.
- **otherwise** (keyword: two indexes' BM25 do not compare; or two spaces: the image side was
  searched with the image model's own text vector): reciprocal rank fusion of the two lists:
  :func:`fuse_ranks`.

A filter is checked against the fields of every index searched: a field that only one of them
has is accepted (it matches nothing in the other), one that none has is a 400. One modality alone
is exactly that modality's search.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np

from deployments.fusion import Ranked, fuse_in_one_space, fuse_ranks, merge_by_score
from deployments.searcher import Searcher, unknown_field
from schemas.api import Modality
from schemas.errors import InvalidRequestError
from schemas.filters import MetadataFilter


class ModalSearcher:
    """Searches the modalities in ``searchers`` (``{"text": ..., "image": ...}``). Safe for
    concurrent use from one event loop."""

    def __init__(self, searchers: Mapping[Modality, Searcher]) -> None:
        self.searchers = dict(searchers)

    async def check_filter(self, filter: MetadataFilter | None, modalities: Sequence[Modality]) -> None:
        """:class:`InvalidRequestError` naming a filter field that no index of ``modalities`` has
        (each searcher's cache is re-read as :meth:`Searcher.check_filter` does)."""
        if filter is None or not filter.conditions:
            return
        searchers = [self._searcher(m) for m in modalities]
        known = set().union(*(s.known_fields for s in searchers))
        if filter.fields - known:
            known = set().union(*await asyncio.gather(*(s.refresh_fields() for s in searchers)))
        unknown = filter.fields - known
        if unknown:
            raise unknown_field(unknown, known)

    async def search(
        self,
        query: str,
        vectors: Mapping[Modality, np.ndarray | None],
        k: int,
        filter: MetadataFilter | None,
        mode: str,
        modalities: Sequence[Modality],
        same_space: bool,
    ) -> list[Ranked]:
        """The top ``k`` over ``modalities``, best first, each hit tagged with its modality.
        ``vectors[m]``: the query's vector for modality ``m``'s index (None in keyword mode);
        ``same_space``: the vectors are one vector in one space (see the module doc)."""
        if len(modalities) == 1:
            [modality] = modalities
            return await self._searcher(modality).search(query, vectors.get(modality), k, filter, mode)
        await self.check_filter(filter, modalities)
        one_space = same_space and mode not in ("keyword", "graph")  # graph: fused by rank
        n = max(k, self._searcher(modalities[0]).config.candidates) if one_space and mode == "hybrid" else k
        lists = await asyncio.gather(
            *(self._one(m, query, vectors.get(m), n, filter, mode) for m in modalities)
        )
        config = self._searcher(modalities[0]).config
        if one_space and mode == "vector":
            return merge_by_score(lists, k)
        if one_space:
            return fuse_in_one_space(lists, k, config.rrf_k, config.vector_weight, config.keyword_weight)
        return fuse_ranks(lists, k, config.rrf_k)

    async def _one(
        self,
        modality: Modality,
        query: str,
        vector: np.ndarray | None,
        k: int,
        filter: MetadataFilter | None,
        mode: str,
    ) -> list[Ranked]:
        vectors = None if vector is None else vector.reshape(1, -1)
        searcher = self._searcher(modality)
        return (
            await searcher.search_many([query], vectors, k, filter, mode, check_filter=False, rerank=False)
        )[0]

    def _searcher(self, modality: Modality) -> Searcher:
        searcher = self.searchers.get(modality)
        if searcher is None:
            raise InvalidRequestError(f"modality {modality!r} is not searched here", param="modalities")
        return searcher
