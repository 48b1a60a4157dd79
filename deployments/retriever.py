"""Retriever deployment: fans a query out to every shard actor of the index and merges the results.

It queries the very shard actors the ingest pipeline writes (detached, named
``<index>/shard/<i>``), so a document is searchable as soon as its write is acknowledged. The
index's images live in an index of their own, ``<index>-images`` (shard actors
``<index>-images/shard/<i>``, one record per image: caption as text, the image model's vector);
the retriever searches it the same way when a request names the ``image`` side or modality, and
an images index that no ingest has created yet is :class:`IndexUnavailableError` as well.

Searches of a FAISS index read the shards' stores in the retriever's own process where its node
reaches them (read replicas that see every committed write: :mod:`deployments.shard_readers`),
which spares a call to each shard actor per query (chunk lookups and the metadata fields read
there too); document status, health and figures ask the actors.

Shard trouble is never a bug: a shard actor that died, is restarting, does not answer within
:data:`SHARD_TIMEOUT_S`, or reports its data unavailable makes the call raise
:class:`IndexUnavailableError` naming the index and the shard (HTTP 503), never anything that
would become a 500. Shard actors restart on failure and Ray retries their pending calls, so
their handles stay valid; the handles of a shard that died for good are looked up again on the
next request (a re-created actor has a new handle). A missing shard actor (no ingest has
created the index yet) is also :class:`IndexUnavailableError`.

``health`` and ``stats`` answer for every shard of the text index whatever state it is in (one
entry per shard, ``status`` ``unavailable`` for one that cannot answer): they feed ``/healthz``
and ``/metrics``, and cost one O(1) call per shard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

from actors.embedder import Embedder
from actors.graph_extract import pipeline_stop_words
from actors.reranker import Reranker
from actors.vector_index import ChunkRecord, Hit
from deployments.fusion import Ranked
from deployments.graph import GraphReader
from deployments.http_errors import cause
from deployments.metrics import http_metrics
from deployments.modal_searcher import ModalSearcher
from deployments.searcher import Searcher, Shards, first_found
from deployments.shard_readers import ReaderShards
from deployments.stage_batching import Batcher
from schemas.api import Modality
from schemas.errors import IndexUnavailableError, NotFoundError, RetryableError
from schemas.filters import MetadataFilter
from schemas.ids import shard_of
from schemas.settings import EmbedConfig, SearchConfig, Settings
from schemas.topology import actor_name

log = logging.getLogger(__name__)

SHARD_TIMEOUT_S = 30.0
"""A search or lookup a shard has not answered by then fails with a 503 naming the shard."""
HEALTH_TIMEOUT_S = 5.0
"""``health``/``stats`` calls are O(1): a shard that needs longer is reported unavailable."""
_Request = tuple[str, "np.ndarray | None", int, "MetadataFilter | None", str, Modality]


class ShardUnavailableError(IndexUnavailableError):
    """Shard ``shard`` of ``index`` cannot answer now (dead, restarting, too slow, or its data is
    unavailable). ``died`` says its actor is gone for good, so its handle must be looked up again."""

    def __init__(self, index: str, shard: int, reason: str, died: bool = False) -> None:
        super().__init__(f"index {index!r}: shard {shard} is unavailable: {reason}; retry shortly")
        self.index, self.shard, self.reason, self.died = index, shard, reason, died

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles errors to send them to the caller; rebuild from the fields, not the message.
        return (type(self), (self.index, self.shard, self.reason, self.died))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def shard_failure(index: str, shard: int, exc: BaseException) -> BaseException:
    """What a failed call to shard ``shard`` means for the caller.

    Shard trouble becomes :class:`ShardUnavailableError`: a timeout, a Ray actor error (died,
    restarting: ``ActorDiedError``, ``ActorUnavailableError``, any ``RayActorError``), any other
    Ray system error (worker crashed, object lost, node died), or the shard's own
    :class:`IndexUnavailableError` / :class:`RetryableError`, which Ray delivers wrapped in a
    ``RayTaskError`` (kept as its ``cause``). Anything else the shard raised (a bad request, a
    bug) is returned as the shard raised it, for the caller to re-raise."""
    if isinstance(exc, TimeoutError):  # asyncio's, and Ray's GetTimeoutError
        return ShardUnavailableError(index, shard, "it did not answer in time")
    inner = cause(exc)
    if isinstance(inner, (IndexUnavailableError, RetryableError)):
        return ShardUnavailableError(index, shard, _first_line(inner))
    if isinstance(exc, ActorDiedError):
        return ShardUnavailableError(index, shard, "its actor died", died=True)
    if isinstance(exc, RayActorError):
        return ShardUnavailableError(
            index, shard, f"its actor is restarting or unreachable ({_first_line(exc)})"
        )
    if isinstance(exc, RayTaskError):
        if isinstance(inner, RayError):  # the shard itself hit a Ray system error
            return ShardUnavailableError(index, shard, _first_line(inner))
        return inner
    if isinstance(exc, RayError):
        return ShardUnavailableError(index, shard, f"{type(exc).__name__}: {_first_line(exc)}")
    return exc


class RayShards:
    """:class:`deployments.searcher.Shards` over the index's shard actors.

    Every method asks all shards concurrently and returns one result per shard, in shard order;
    it raises :class:`ShardUnavailableError` for the first shard in trouble (see
    :func:`shard_failure`). Used from one event loop (the replica's)."""

    def __init__(self, settings: Settings, timeout_s: float = SHARD_TIMEOUT_S) -> None:
        self.index = settings.index.name
        self.n_shards = settings.index.n_shards
        self.namespace = settings.ray.namespace
        self.timeout_s = timeout_s
        self._handles: list[Any] | None = None

    def handle(self, shard: int) -> Any:
        """Looks up shard ``shard``'s actor; :class:`IndexUnavailableError` if it does not exist.
        Blocking (a call to Ray's control store)."""
        name = actor_name(self.index, "shard", shard)
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError as exc:
            raise IndexUnavailableError(
                f"index {self.index!r} is not ready: shard {shard}'s actor {name!r} does not exist "
                "(start `riverbed ingest` or `riverbed serve` for this index)"
            ) from exc

    def handles(self) -> list[Any]:
        """Every shard's actor handle, looked up once and cached until a shard dies for good.
        Blocking the first time."""
        if self._handles is None:
            self._handles = [self.handle(i) for i in range(self.n_shards)]
        return self._handles

    async def _current_handles(self) -> list[Any]:
        handles = self._handles
        if handles is None:  # the lookup blocks: keep it off the replica's event loop
            handles = await asyncio.to_thread(self.handles)
        return handles

    def forget(self) -> None:
        """Drops the cached handles: the next call looks every shard up again."""
        self._handles = None

    async def _one(self, shard: int, call: Awaitable[Any], timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(call, timeout_s)
        except Exception as exc:
            failure = shard_failure(self.index, shard, exc)
            if failure is exc:
                raise
            if isinstance(failure, ShardUnavailableError):
                log.warning("%s", failure)
                if failure.died:
                    self.forget()
            raise failure from exc

    async def call_one(self, shard: int, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """``method(*args)`` on shard ``shard``'s actor (within ``timeout_s``, else the shards')."""
        handles = await self._current_handles()
        call = getattr(handles[shard], method).remote(*args)
        return await self._one(shard, call, timeout_s or self.timeout_s)

    async def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard actor at once; the results in shard order."""
        handles = await self._current_handles()
        calls = [
            self._one(i, getattr(h, method).remote(*args), self.timeout_s) for i, h in enumerate(handles)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:  # shard order: the lowest failing shard is the one named
            if isinstance(result, BaseException):
                raise result
        return results

    async def search(
        self, vectors: np.ndarray, k: int, filter: MetadataFilter | None
    ) -> list[list[list[Hit]]]:
        return await self.call_all("search", vectors, k, filter)

    async def keyword_search(
        self, queries: list[str], k: int, filter: MetadataFilter | None, title_weight: float
    ) -> list[list[list[Hit]]]:
        return await self.call_all("keyword_search", queries, k, filter, title_weight)

    async def metadata_fields(self) -> list[set[str]]:
        return await self.call_all("metadata_fields")

    async def documents(self, document_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
        return await self.call_all("documents", document_ids)

    async def get(self, chunk_ids: list[str]) -> list[ChunkRecord | None]:
        return first_found(await self.call_all("get", chunk_ids))

    # HEALTH: never raises for shard trouble; one entry per shard.
    async def health(self) -> list[dict[str, Any]]:
        """Per shard ``{"shard", "status": "ok"|"degraded"|"unavailable", "problem", "chunks",
        "vectors"}`` from its O(1) ``health()`` (or ``stats()`` from a shard that has no
        ``health()``: ok when it answers). A shard that cannot answer is ``unavailable`` with
        the reason as ``problem``."""
        return list(await asyncio.gather(*(self._health(i) for i in range(self.n_shards))))

    async def stats(self) -> list[dict[str, Any]]:
        """Per shard its ``health`` entry, plus its O(1) ``stats()`` figures (``chunks``,
        ``vectors``, ``documents``, ``offsets``, ``path``) when it answers them."""
        return list(await asyncio.gather(*(self._stats(i) for i in range(self.n_shards))))

    async def _health(self, shard: int) -> dict[str, Any]:
        try:
            handle = await self._handle_for_health(shard)
            if hasattr(handle, "health"):
                report: dict[str, Any] = await self._one(shard, handle.health.remote(), HEALTH_TIMEOUT_S)
                return {"shard": shard, "problem": None, **report}
            stats = await self._one(shard, handle.stats.remote(), HEALTH_TIMEOUT_S)
            return {"shard": shard, "status": "ok", "problem": None,
                    "chunks": stats.get("chunks"), "vectors": stats.get("vectors")}  # fmt: skip
        except Exception as exc:
            return _unavailable(shard, exc)

    async def _stats(self, shard: int) -> dict[str, Any]:
        report = await self._health(shard)
        if report["status"] == "unavailable":
            return report
        try:
            handle = await self._handle_for_health(shard)
            stats: dict[str, Any] = await self._one(shard, handle.stats.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return _unavailable(shard, exc)
        return {**stats, "shard": shard, "status": report["status"], "problem": report.get("problem")}

    async def _handle_for_health(self, shard: int) -> Any:
        handles = self._handles
        if handles is not None:
            return handles[shard]
        return await asyncio.to_thread(self.handle, shard)


async def _registry_entry(shards: RayShards, document_id: str) -> dict[str, Any]:
    per_shard = await shards.documents([document_id])
    info: dict[str, Any] = {"chunks": sum(p[document_id]["chunks"] for p in per_shard)}
    info.update({k: v for k, v in per_shard[shard_of(document_id, len(per_shard))][document_id].items()
                 if k != "chunks"})  # fmt: skip
    return info


def _unavailable(shard: int, exc: BaseException) -> dict[str, Any]:
    reason = exc.reason if isinstance(exc, ShardUnavailableError) else _first_line(exc)
    return {"shard": shard, "status": "unavailable", "problem": reason}


def searchable(settings: Settings, actors: RayShards) -> Shards:
    """What searches read: the shards' stores in this process where it reaches them (FAISS, with
    ``serve.search.readers``: :class:`~deployments.shard_readers.ReaderShards`), else the actors."""
    if settings.serve.search.readers and settings.index.backend == "faiss":
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        search = settings.serve.search
        return ReaderShards(
            actors, settings.index.faiss, search.reader_check_s, node, ask_timeout_s=HEALTH_TIMEOUT_S
        )
    return actors


def text_reranker(settings: Settings) -> Reranker | None:
    """The cross-encoder that text searches are reranked with (loaded now), or None when
    ``serve.search.rerank`` is off."""
    if not settings.serve.search.rerank:
        return None
    serve_config = settings.serve
    reranker = Reranker(  # as many torch threads as the query model (serve.query_threads)
        serve_config.search, settings.cache_dir, settings.finetune, float(serve_config.query_threads)
    )
    reranker.warm_up()
    return reranker


@serve.deployment
class Retriever:
    """Searches, document lookups and shard health for ``settings.index``, over its shard actors,
    and searches and lookups of its images (``settings.image_side()``). Every shard failure
    surfaces as :class:`IndexUnavailableError` naming the index and shard (HTTP 503)."""

    def __init__(self, settings: Settings, embed: EmbedConfig | None = None) -> None:
        # Text queries may come without their vector: embedded here, the concurrent ones in one
        # forward pass, so a text search is one call from the ingress.
        self.embedder: Embedder | None = None
        if embed is not None:
            self.embedder = Embedder(embed)
            self.embedder.warm_up()
        self._batchers(settings.serve.search)
        self.shards = RayShards(settings)
        self.image_shards = RayShards(settings.image_side())
        # An app served without its graph answers graph routes 404 and graph mode 400 (it is not
        # a transient trouble); with graph.enabled, a graph no ingest has built yet answers 503.
        self.graph_shards = RayShards(settings.graph_side()) if settings.graph.enabled else None
        self.graph = (
            GraphReader(self.graph_shards, pipeline_stop_words(settings.graph.model))
            if self.graph_shards is not None
            else None
        )
        self.index = settings.index.name
        config = settings.serve.search
        self.reranker = text_reranker(settings)
        self.searchers: dict[Modality, Searcher] = {
            "text": Searcher(
                config, searchable(settings, self.shards), graph=self.graph, reranker=self.reranker
            ),
            "image": Searcher(config, searchable(settings.image_side(), self.image_shards), modality="image"),
        }
        self.searcher = self.searchers["text"]
        self.modal = ModalSearcher(self.searchers)

    async def search(
        self,
        query: str,
        vector: np.ndarray | None,
        k: int,
        filter: MetadataFilter | None,
        mode: str,
        side: Modality = "text",
    ) -> list[Ranked]:
        """One query's top ``k`` in the text index (``side`` text) or the images index (image).
        A text query without its ``vector`` (in a mode that needs one) is embedded here.
        Concurrent queries are batched: the text ones without a vector share one forward pass,
        and those with the same ``k``, filter, mode and side one search of each shard. Raises
        :class:`IndexUnavailableError` (naming the shard) when a shard cannot answer,
        :class:`InvalidRequestError` for a bad filter or mode."""
        if vector is None and mode != "keyword" and side == "text":
            vector = await self._embedding(query)
        result = await self._searching((query, vector, k, filter, mode, side))
        if isinstance(result, Exception):
            raise result
        return result

    async def embed(self, text: str) -> np.ndarray:
        """The vector a text search embeds ``text`` with (``(dim,)`` float32, unit norm): what a
        search of the images or of both modalities sends with the query. Concurrent calls share
        one forward pass."""
        return await self._embedding(text)

    def _batchers(self, config: SearchConfig) -> None:
        """The two stages a search goes through, each batched continuously
        (:mod:`deployments.stage_batching`): the query model's forward pass, then the shards' search.
        They run side by side: one batch embeds while the one before it searches; two searches may
        run at once, so that one held up (a shard slow to answer, a reranking) does not hold up all."""
        metrics = http_metrics()  # riverbed_query_batch_size, on /metrics of an ingress that searches
        self._embedding: Batcher[str, np.ndarray] = Batcher(
            self._embed_texts, config.embed_batch_size, config.embed_batch_wait_s, metrics.batched("embed")
        )
        self._searching: Batcher[_Request, list[Ranked] | Exception] = Batcher(
            self._search_batch, config.embed_batch_size, observe=metrics.batched("search"), lanes=2
        )

    async def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        if self.embedder is None:  # a bug in whoever built this replica: a 500
            raise RuntimeError("this retriever was built without an embedder: searches bring their vectors")
        vectors = await asyncio.to_thread(self.embedder.embed, texts)
        return list(vectors)

    def describe(self) -> dict[str, Any]:
        """The text model that queries are embedded with: ``{"model", "dim", "device"}``."""
        if self.embedder is None:
            raise RuntimeError("this retriever was built without an embedder: searches bring their vectors")
        return {"model": self.embedder.model_name, "dim": self.embedder.dim, "device": self.embedder.device}

    async def search_modalities(
        self,
        query: str,
        vectors: dict[Modality, np.ndarray | None],
        k: int,
        filter: MetadataFilter | None,
        mode: str,
        modalities: list[Modality],
        same_space: bool,
    ) -> list[Ranked]:
        """The top ``k`` over passages and images together: see :meth:`ModalSearcher.search`."""
        return await self.modal.search(query, vectors, k, filter, mode, modalities, same_space)

    async def _search_batch(self, requests: list[_Request]) -> list[list[Ranked] | Exception]:
        """The search stage: the requests with the same ``k``, filter, mode and side in one search
        of each shard; a group's error (a bad filter, a shard down) is its requests' alone."""
        out: list[list[Ranked] | Exception] = [[] for _ in requests]
        groups: dict[tuple[int, str, str, str], list[int]] = {}
        for i, (_, _, k, filter, mode, side) in enumerate(requests):
            key = (k, filter.model_dump_json() if filter is not None else "", mode, side)
            groups.setdefault(key, []).append(i)

        async def run(indices: list[int]) -> None:
            _, _, k, filter, mode, side = requests[indices[0]]
            queries = [requests[i][0] for i in indices]
            vectors = [requests[i][1] for i in indices]
            matrix = None if any(v is None for v in vectors) else np.stack(vectors)  # type: ignore[arg-type]
            try:
                results = await self.searchers[side].search_many(queries, matrix, k, filter, mode)
            except Exception as exc:  # this group's error (a bad filter, a shard down) is its callers' alone
                results = [exc] * len(indices)  # type: ignore[list-item]
            for i, result in zip(indices, results, strict=True):
                out[i] = result

        await asyncio.gather(*(run(indices) for indices in groups.values()))
        return out

    async def document(self, document_id: str) -> dict[str, Any]:
        """``{"kind", "chunks": total over shards, "content_hash", "n_chunks", "source"}`` (the
        last three only while the row exists, on its registry shard) of the document, or of the
        image when no document has the id (``kind``: ``document``, ``image``, or None when
        neither is indexed). The text index's unavailability is the error, whatever the images
        index holds (a document may have the id); an images index that cannot answer (none yet)
        only means no image."""
        found = await asyncio.gather(
            _registry_entry(self.shards, document_id),
            _registry_entry(self.image_shards, document_id),
            return_exceptions=True,
        )
        text: dict[str, Any] | BaseException = found[0]
        image: dict[str, Any] | BaseException = found[1]
        if isinstance(text, BaseException):
            raise text  # a document may have the id: an image's answer would be a guess
        if text["chunks"] > 0:
            return {**text, "kind": "document"}
        if isinstance(image, dict) and image["chunks"] > 0:
            return {**image, "kind": "image"}
        if isinstance(image, BaseException) and not isinstance(image, IndexUnavailableError):
            raise image  # a bug, not an images index that is not there
        return {**text, "kind": None}

    # KNOWLEDGE GRAPH (deployments.graph)
    def _graph(self) -> GraphReader:
        """The graph's reader; NotFoundError (404) when this app serves no graph."""
        if self.graph is None:
            raise NotFoundError(
                f"index {self.index!r} is served without its knowledge graph: "
                "serve it with graph.enabled (--set graph.enabled=true) to build and query one"
            )
        return self.graph

    async def graph_entities(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        return await self._graph().search(prefix, limit)

    async def graph_entity(self, name: str, limit: int) -> dict[str, Any]:
        return await self._graph().entity(name, limit)

    async def graph_neighbourhood(self, name: str, hops: int, limit: int) -> dict[str, Any]:
        return await self._graph().neighbourhood(name, hops, limit)

    async def graph_paths(self, source: str, target: str, max_hops: int, limit: int) -> list[dict[str, Any]]:
        return await self._graph().paths(source, target, max_hops, limit)

    async def health(self) -> list[dict[str, Any]]:
        """Every shard's health (see :meth:`RayShards.health`); never raises for shard trouble."""
        return await self.shards.health()

    async def stats(self) -> list[dict[str, Any]]:
        """Every shard's health and figures (see :meth:`RayShards.stats`); never raises for shard
        trouble."""
        return await self.shards.stats()

    async def graph_health(self) -> list[dict[str, Any]]:
        """Every knowledge-graph shard's health, as :meth:`health`; ``[]`` when the app serves no
        graph."""
        return await self.graph_shards.health() if self.graph_shards is not None else []
