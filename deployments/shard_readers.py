"""ReaderShards: the :class:`~deployments.searcher.Shards` a retriever searches through, reading
FAISS shards in its own process where it can and asking their actors where it cannot.

A shard actor is the one writer of its store. A read replica (:meth:`FaissIndex.reader
<actors.faiss_index.FaissIndex.reader>`) in the retriever's process searches the same store
without a call to the actor: no serialisation of the query vectors and hits, no wait behind the
actor's writes. It takes the writes committed since its last call before every search, so a
search sees every write its shard committed before the search began: the same as asking the
actor, whose writes are visible once committed.

Which path a shard takes is decided per shard and re-decided every ``reader_check_s``: the
retriever asks the shard's actor for :meth:`~actors.index_shard.IndexShard.reader_source` (its
store's directory, store id and Ray node; None for Milvus, or a shard that cannot serve) and
reads locally only when the actor runs on this process's Ray node and this process opens that
directory and finds the same store id. Never from another node, even where a volume is shared:
SQLite's WAL index is shared memory between the processes of one host. Otherwise, when the actor
cannot be asked, or when a reader fails, the call goes to the actor, which answers or raises what
makes the request a 503 naming the shard. So a shard the actor stops serving is no longer read
here within ``reader_check_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from actors.faiss_index import FaissIndex
from actors.vector_index import ChunkRecord, Hit
from deployments.searcher import first_found
from schemas.filters import MetadataFilter
from schemas.settings import FaissConfig

log = logging.getLogger(__name__)


class ShardActors(Protocol):
    """The shard actors of one index (:class:`deployments.retriever.RayShards`)."""

    n_shards: int

    async def call_one(self, shard: int, method: str, *args: Any) -> Any: ...


class ReaderShards:
    """:class:`~deployments.searcher.Shards` over local readers where possible, else ``actors``."""

    def __init__(
        self,
        actors: ShardActors,
        config: FaissConfig,
        check_s: float,
        node: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.actors = actors
        self.node = node  # this process's Ray node (None: not on Ray, tests)
        self.config = config
        self.check_s = check_s
        self._clock = clock
        n = actors.n_shards
        self._readers: list[FaissIndex | None] = [None] * n
        self._checked = [-float("inf")] * n
        self._locks = [asyncio.Lock() for _ in range(n)]

    def local(self) -> list[bool]:
        """Per shard, whether it is read in this process now."""
        return [r is not None for r in self._readers]

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

    async def get(self, chunk_ids: list[str]) -> list[ChunkRecord | None]:
        return first_found(await self._all("get", chunk_ids))

    def close(self) -> None:
        for i, reader in enumerate(self._readers):
            if reader is not None:
                reader.close()
            self._readers[i] = None

    async def _all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard, in shard order; the lowest failing shard's error."""
        results = await asyncio.gather(
            *(self._one(i, method, *args) for i in range(len(self._readers))), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _one(self, shard: int, method: str, *args: Any) -> Any:
        reader = await self._reader(shard)
        if reader is not None:
            try:
                return await asyncio.to_thread(getattr(reader, method), *args)
            except Exception as exc:  # the actor says what is wrong, or answers
                log.warning("shard %d: its reader failed (%s); asking the actor", shard, exc)
                self._drop(shard)
        return await self.actors.call_one(shard, method, *args)

    async def _reader(self, shard: int) -> FaissIndex | None:
        """Shard ``shard``'s reader, after asking its actor where its store is when that was last
        asked ``check_s`` ago (one question at a time per shard)."""
        if self._clock() - self._checked[shard] < self.check_s:
            return self._readers[shard]
        async with self._locks[shard]:
            if self._clock() - self._checked[shard] < self.check_s:
                return self._readers[shard]
            try:
                source = await self.actors.call_one(shard, "reader_source")
            except Exception:  # the actor cannot be asked: the call goes to it, and says why
                source = None
            self._checked[shard] = self._clock()
            reader = self._readers[shard]
            if source is None:
                self._drop(shard)
            elif (
                reader is None or str(reader.path) != source["path"] or reader.store_id != source["store_id"]
            ):
                self._drop(shard)
                self._readers[shard] = await asyncio.to_thread(self._open, shard, source)
            return self._readers[shard]

    def _open(self, shard: int, source: dict[str, str]) -> FaissIndex | None:
        """A reader of the store ``source`` names, or None when this node does not hold it."""
        path = Path(source["path"])
        if source.get("node") != self.node or not path.is_dir():
            return None
        try:
            reader = FaissIndex.reader(path, self.config)
        except Exception as exc:
            log.info("shard %d: no reader of %s here (%s); asking the actor", shard, path, exc)
            return None
        if reader.store_id != source["store_id"]:  # another store at the same path: not this node's
            reader.close()
            return None
        log.info("shard %d: read in process from %s", shard, path)
        return reader

    def _drop(self, shard: int) -> None:
        reader, self._readers[shard] = self._readers[shard], None
        if reader is not None:
            reader.close()
