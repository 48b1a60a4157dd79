"""Retriever deployment: fans a query out to every shard actor of the index and merges the results.

It queries the very shard actors the ingest pipeline writes (detached, named
``<index>/shard/<i>``), so a document is searchable as soon as its write is acknowledged. Shard
actors restart on failure and their handles stay valid; a missing shard (no ingest has created
the index yet) raises :class:`IndexUnavailableError` (HTTP 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import ray
from ray import serve

from actors.vector_index import Hit
from deployments.fusion import Ranked
from deployments.searcher import Searcher
from schemas.errors import IndexUnavailableError
from schemas.filters import MetadataFilter
from schemas.ids import shard_of
from schemas.settings import Settings

SHARD_TIMEOUT_S = 30.0
_Request = tuple[str, "np.ndarray | None", int, "MetadataFilter | None", str]


class RayShards:
    """:class:`deployments.searcher.Shards` over the index's shard actors."""

    def __init__(self, settings: Settings) -> None:
        self.index = settings.index.name
        self.n_shards = settings.index.n_shards
        self.namespace = settings.ray.namespace
        self._handles: list[Any] | None = None

    def handles(self) -> list[Any]:
        if self._handles is None:
            handles = []
            for i in range(self.n_shards):
                name = f"{self.index}/shard/{i}"
                try:
                    handles.append(ray.get_actor(name, namespace=self.namespace))
                except ValueError as exc:
                    raise IndexUnavailableError(
                        f"index {self.index!r} is not ready: shard actor {name!r} does not exist "
                        "(start `riverbed ingest` or `riverbed serve` for this index)"
                    ) from exc
            self._handles = handles
        return self._handles

    async def _all(self, method: str, *args: Any) -> list[Any]:
        refs = [getattr(h, method).remote(*args) for h in self.handles()]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*refs), SHARD_TIMEOUT_S))
        except (TimeoutError, ray.exceptions.RayActorError) as exc:
            raise IndexUnavailableError(f"index {self.index!r}: a shard did not answer: {exc}") from exc

    async def search(
        self, vectors: np.ndarray, k: int, filter: MetadataFilter | None
    ) -> list[list[list[Hit]]]:
        return await self._all("search", vectors, k, filter)

    async def keyword_search(
        self, queries: list[str], k: int, filter: MetadataFilter | None, title_weight: float
    ) -> list[list[list[Hit]]]:
        return await self._all("keyword_search", queries, k, filter, title_weight)

    async def metadata_fields(self) -> list[set[str]]:
        return await self._all("metadata_fields")

    async def documents(self, document_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
        return await self._all("documents", document_ids)

    async def stats(self) -> list[dict[str, Any]]:
        return await self._all("stats")


@serve.deployment
class Retriever:
    def __init__(self, settings: Settings) -> None:
        self.shards = RayShards(settings)
        self.searcher = Searcher(settings.serve.search, self.shards)

    async def search(
        self, query: str, vector: np.ndarray | None, k: int, filter: MetadataFilter | None, mode: str
    ) -> list[Ranked]:
        """One query's top ``k``. Concurrent queries are batched: those with the same ``k``,
        filter and mode cost one call per shard together."""
        result = await self._batched((query, vector, k, filter, mode))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _batched(self, requests: list[_Request]) -> list[list[Ranked] | Exception]:
        groups: dict[tuple[int, str, str], list[int]] = {}
        for i, (_, _, k, filter, mode) in enumerate(requests):
            key = (k, filter.model_dump_json() if filter is not None else "", mode)
            groups.setdefault(key, []).append(i)
        out: list[list[Ranked] | Exception] = [[] for _ in requests]

        async def run(indices: list[int]) -> None:
            _, _, k, filter, mode = requests[indices[0]]
            queries = [requests[i][0] for i in indices]
            vectors = [requests[i][1] for i in indices]
            matrix = None if any(v is None for v in vectors) else np.stack(vectors)  # type: ignore[arg-type]
            try:
                results = await self.searcher.search_many(queries, matrix, k, filter, mode)
            except Exception as exc:  # this group's error (a bad filter) is its callers' alone
                results = [exc] * len(indices)  # type: ignore[list-item]
            for i, result in zip(indices, results, strict=True):
                out[i] = result

        await asyncio.gather(*(run(indices) for indices in groups.values()))
        return out

    async def document(self, document_id: str) -> dict[str, Any]:
        """``{"chunks": total over shards, "content_hash", "n_chunks", "source"}`` (the last three
        only while the document's row exists, on its registry shard)."""
        per_shard = await self.shards.documents([document_id])
        info: dict[str, Any] = {"chunks": sum(p[document_id]["chunks"] for p in per_shard)}
        info.update({k: v for k, v in per_shard[shard_of(document_id, len(per_shard))][document_id].items()
                     if k != "chunks"})  # fmt: skip
        return info

    async def stats(self) -> list[dict[str, Any]]:
        return await self.shards.stats()
