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
cannot be asked (within ``ask_timeout_s``), or when a reader fails, the call goes to the actor,
which answers or raises what makes the request a 503 naming the shard. A reader that serves keeps
serving while its actor is asked again in the background, so a shard the actor stops serving, or
whose actor moved to another node, is no longer read here within ``reader_check_s`` plus
``ask_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from actors.vector_index import ChunkRecord, Hit
from deployments.searcher import first_found
from schemas.errors import IndexUnavailableError
from schemas.filters import MetadataFilter
from schemas.settings import FaissConfig

if TYPE_CHECKING:  # imported where a reader opens: a Milvus-only install has no FAISS
    from actors.faiss_index import FaissIndex

log = logging.getLogger(__name__)


READER_TROUBLE = (IndexUnavailableError, sqlite3.Error, OSError, RuntimeError)
"""What a reader raises when it, not the request, is in trouble (its store closed or gone, an
I/O error, FAISS failing): the call then goes to the actor. A bad request's error is raised as
the actor would raise it."""


class ShardActors(Protocol):
    """The shard actors of one index (:class:`deployments.retriever.RayShards`)."""

    n_shards: int

    async def call_one(self, shard: int, method: str, *args: Any, timeout_s: float | None = None) -> Any: ...


class ReaderShards:
    """:class:`~deployments.searcher.Shards` over local readers where possible, else ``actors``."""

    def __init__(
        self,
        actors: ShardActors,
        config: FaissConfig,
        check_s: float,
        node: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        ask_timeout_s: float = 5.0,
    ) -> None:
        self.actors = actors
        self.node = node  # this process's Ray node (None: not on Ray, tests)
        self.config = config
        self.check_s = check_s
        self.ask_timeout_s = ask_timeout_s
        self._clock = clock
        n = actors.n_shards
        self._readers: list[FaissIndex | None] = [None] * n
        self._sources: list[dict[str, str] | None] = [None] * n  # what each reader was opened for
        self._checked = [-float("inf")] * n
        self._locks = [asyncio.Lock() for _ in range(n)]
        self._refreshing: set[asyncio.Future[None]] = set()

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
            self._readers[i], self._sources[i] = None, None

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
            except READER_TROUBLE as exc:  # the actor says what is wrong, or answers
                log.warning("shard %d: its reader failed (%s); asking the actor", shard, exc)
                await self._drop(shard, reader)
        return await self.actors.call_one(shard, method, *args)

    async def _reader(self, shard: int) -> FaissIndex | None:
        """Shard ``shard``'s reader. Every ``check_s`` its actor is asked again where its store is
        (one question at a time per shard): while a reader serves, in the background, so that a
        slow actor never holds a search up; without one, before answering."""
        if self._clock() - self._checked[shard] >= self.check_s and not self._locks[shard].locked():
            self._checked[shard] = self._clock()
            refresh = asyncio.ensure_future(self._refresh(shard))
            if self._readers[shard] is None:
                await refresh
            else:
                self._refreshing.add(refresh)  # held until done: the loop keeps only weak references
                refresh.add_done_callback(self._refreshing.discard)
        return self._readers[shard]

    async def _refresh(self, shard: int) -> None:
        async with self._locks[shard]:
            try:
                source = await self.actors.call_one(shard, "reader_source", timeout_s=self.ask_timeout_s)
            except Exception:  # the actor cannot be asked: calls go to it, and say why
                source = None
            self._checked[shard] = self._clock()
            if source == self._sources[shard] and self._readers[shard] is not None:
                return
            await self._drop(shard, self._readers[shard])
            if source is not None:
                self._readers[shard] = await asyncio.to_thread(self._open, shard, source)
                self._sources[shard] = source

    def _open(self, shard: int, source: dict[str, str]) -> FaissIndex | None:
        """A reader of the store ``source`` names, or None when this node does not hold it."""
        path = Path(source["path"])
        if source.get("node") != self.node or not path.is_dir():
            return None
        from actors.faiss_index import FaissIndex

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

    async def _drop(self, shard: int, reader: FaissIndex | None) -> None:
        """Closes ``reader`` if it is still shard ``shard``'s (off the event loop: closing waits
        for a search in progress)."""
        if reader is None or self._readers[shard] is not reader:
            return
        self._readers[shard], self._sources[shard] = None, None
        await asyncio.to_thread(reader.close)
