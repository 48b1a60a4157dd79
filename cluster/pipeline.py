"""The ingest pipeline on Ray: which actors, how many, where, and how the driver watches them.

Actors, named ``<index>/<role>/<i>`` in the settings' Ray namespace (:mod:`schemas.topology`):

- ``shard``: detached, so `serve` finds the shards that `ingest` writes; restarted on failure
  (``max_restarts=-1``), on the node that holds its store while that node lives, and their pending
  calls retried (``max_task_retries=-1``): every write is an idempotent, versioned upsert, so a
  retried call changes nothing twice and a late one never overwrites a newer version. A shard
  killed for good (``ray.kill`` without restart) is found by name, or created again from its data
  on disk, by the next write of a running ingest: a dead handle never stalls the stream.
- ``embedder``: restarted and retried the same way; gets ``embed.num_cpus`` CPUs (its torch
  threads) and ``embed.num_gpus`` GPUs.
- ``source``: one stream consumer of the documents topic per ``ingest.sources``, members of the
  index's consumer group; they live as long as the ingest run.

Images (when ``images.ingest`` says so, :func:`images_enabled`) take the same path beside the text:
the index ``<index>-images`` (:meth:`~schemas.settings.Settings.image_side`) gets its own shards (the
same :class:`ShardActor`), an image embedder (:class:`ImageEmbedderActor`, the image-text model)
(``images.num_gpus`` GPUs, apart from the text embedder's) and one source, consuming the images
topic in that index's consumer group with the
:class:`~actors.image_processor.ImageProcessor`. Its offsets, dead letters and restarts are its own:
a stalled image model never holds back the text, nor the reverse.

Resources: Ray's logical CPUs are a scheduling budget. Sources take a fraction (``LIGHT_CPUS``) so
that on a small machine they never wait behind the embedder for a whole logical CPU; shards take
almost none (``SHARD_CPUS``): they are detached and stay up between commands, and 0.05 per shard of
every index ever ingested added up until a `serve` of another index no longer fit. An embedder that cannot be
placed on a local head is refused with the names of whoever holds the CPUs, never waited for
forever. The image embedder asks for a fraction too (``IMAGE_EMBED_CPUS``) while running
``images.num_cpus`` torch threads (every core but one when unset: :func:`ingest_image_config`), and
so does the knowledge graph's extractor (``GRAPH_EXTRACT_CPUS``, one spaCy thread): on a small
machine the embedders share the cores, and each is busy only while its topic has records.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import ray
from ray.exceptions import ActorDiedError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.backends import backend_for
from actors.batching import plan_pixel_batches
from actors.embedder import Embedder, cpu_threads
from actors.graph_extract import ChunkGraph, Extractor
from actors.graph_store import DB_NAME as GRAPH_DB_NAME
from actors.graph_store import GraphStore, recorded_graph_model
from actors.image_model import ImageTextModel
from actors.index_shard import IndexShard
from actors.models import TRAINED_MODELS, resolve_image_model
from actors.processor import StoredDocument, merge_stored
from actors.shard_identity import applied_offsets, committed_problem
from actors.source import document_consumer, graph_consumer, image_consumer
from actors.vector_index import DocumentRow, ShardWrite, WriteResult
from cluster.kafka_admin import bootstrap_servers, committed_offsets, end_offsets, ensure_topics, topic_specs
from cluster.ray_runtime import connect
from schemas import topology
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError, RiverbedError
from schemas.ids import shard_of
from schemas.settings import EmbedConfig, GraphConfig, ImagesConfig, IndexConfig, Settings
from schemas.topology import Offsets, Version, actor_name

log = logging.getLogger(__name__)

LIGHT_CPUS = 0.05
IMAGE_EMBED_CPUS = LIGHT_CPUS
GRAPH_EXTRACT_CPUS = LIGHT_CPUS
"""The image embedder's and the graph extractor's shares: with the text embedder on every core and
an app beside them, the rest of a small machine's budget (Ray's cores + 1) is one logical CPU."""
SHARD_CPUS = 0.001
"""Not 0: Ray 2.60 places an actor that requests no resources on the node that creates it, whatever
its node affinity says (measured with ``ray.cluster_utils.Cluster``). A thousandth, so that the idle
shards of many indexes never add up to a CPU."""
_RESTART = {"max_restarts": -1, "max_task_retries": -1}
SHARD_CALL_TIMEOUT_S = 120.0
"""A shard call not answered by then is retried (every write is idempotent), so a lost reply
never stalls the source."""


def embed_cpus(settings: Settings) -> float:
    """The embedder's CPUs (= its torch threads): ``embed.num_cpus``, or every core of the node."""
    return settings.embed.num_cpus if settings.embed.num_cpus is not None else float(os.cpu_count() or 1)


class EmbedderActor(Embedder):
    def __init__(self, config: EmbedConfig) -> None:
        super().__init__(config)
        self.warm_up()

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "dim": self.dim,
            "device": self.device,
            "batch_limits": self.batch_limits,
        }

    def ping(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def ingest_image_config(config: ImagesConfig) -> ImagesConfig:
    """The image settings the ingest's image embedder runs with: ``images.num_cpus`` unset means
    every usable core but one (at least one), not every core. The stream's own work (the Kafka
    client, decoding and thumbnails, the shards, the broker when local) needs a core while the
    forward runs: measured on 2 cores (`riverbed bench images --split train`, 3,578 images), the
    riverbed LiT model ingested 202 images/s with two torch threads and 197 with one, whose raw
    forward is 209 (two: 313), so the second thread only took the CPU from the rest."""
    if config.num_cpus is not None:
        return config
    return config.model_copy(update={"num_cpus": float(max(1, cpu_threads(None) - 1))})


def image_embedder_options(settings: Settings) -> dict[str, Any]:
    """The Ray options of the ingest's image embedder: named in the image side's index, a light CPU
    share (its torch threads are :func:`ingest_image_config`'s) and ``images.num_gpus`` GPUs, its
    own reservation (the text embedder's is ``embed.num_gpus``: asking both for a whole GPU on a
    one-GPU node would leave one of them waiting forever)."""
    side = settings.image_side()
    return {
        "name": actor_name(side.index.name, "embedder", 0),
        "namespace": side.ray.namespace,
        "get_if_exists": True,
        "num_cpus": IMAGE_EMBED_CPUS,
        "num_gpus": settings.images.num_gpus,
        **_RESTART,
    }


class ImageEmbedderActor:
    """The image-text model as the ingest's image embedder: ``embed`` takes the image processor's
    inputs (RGB pixel arrays, ``(H, W, 3)`` uint8) and returns one unit vector per image, in
    forward passes of at most ``images.batch_size`` images and ``images.max_batch_pixels`` pixels.
    Its torch threads: :func:`ingest_image_config`."""

    def __init__(self, config: ImagesConfig, text_model: str, cache_dir: Path) -> None:
        config = ingest_image_config(config)
        self.config = config
        self.model = ImageTextModel(config, text_model=text_model, cache_dir=cache_dir)
        self.model.warm_up()
        self._work = {"calls": 0, "images": 0, "seconds": 0.0, "cpu_seconds": 0.0}

    def embed(self, inputs: list[np.ndarray]) -> np.ndarray:
        from PIL import Image

        began, cpu_began = time.perf_counter(), time.thread_time()
        batches = plan_pixel_batches(
            [int(a.shape[0]) * int(a.shape[1]) for a in inputs],
            self.config.max_batch_pixels,
            self.config.batch_size,
        )
        out = np.zeros((len(inputs), self.model.dim), dtype=np.float32)
        for batch in batches:
            out[batch] = self.model.embed_images([Image.fromarray(inputs[i]) for i in batch])
        self._work["calls"] += 1
        self._work["images"] += len(inputs)
        self._work["seconds"] += time.perf_counter() - began
        self._work["cpu_seconds"] += time.thread_time() - cpu_began
        return out

    def work(self) -> dict[str, float]:
        """What :meth:`embed` did since the actor (re)started: ``calls``, ``images``, ``seconds``
        inside it (wall clock) and ``cpu_seconds`` of the calling thread's CPU over them (with one
        torch thread, the forward runs on it: wall above CPU is time the thread waited for a
        core)."""
        return dict(self._work)

    def describe(self) -> dict[str, Any]:
        """``model``: the identity the image shards record: a trained model's directory name (it
        holds the hash of the training settings, so another training is another model), else the
        id as configured."""
        model = self.model.model_name
        if model in TRAINED_MODELS:
            model = Path(self.model.location).name
        return {"model": model, "dim": self.model.dim, "text_space": self.model.text_space}

    def ping(self) -> int:
        return os.getpid()


class ExtractorActor(Extractor):
    """The knowledge graph's extractor: the graph side's "embedder" (``embed`` returns one
    :class:`~actors.graph_extract.Facts` per chunk text, as an object array)."""

    def __init__(self, config: GraphConfig) -> None:
        super().__init__(config)
        self.warm_up()

    def describe(self) -> dict[str, Any]:
        """``model``: the identity the graph shards record (:attr:`Extractor.identity`)."""
        return {"model": self.identity, "dim": 0}

    def ping(self) -> int:
        return os.getpid()


class GraphShardActor:
    """A knowledge-graph shard as a detached actor: its :class:`~actors.graph_store.GraphStore` in
    the graph index's shard directory, its view rebuilt from the store at each (re)start.

    Like a vector shard (:class:`ShardActor`), each (re)start first reads the graph's consumer
    group's committed offsets: a shard whose store holds less than was committed (its directory is
    on another node, or was lost) neither serves nor writes (every call raises
    IndexUnavailableError saying why) rather than answer from an incomplete graph; the stream
    retries its writes meanwhile. When the broker cannot be asked then, an existing store serves
    reads, but writes wait (RetryableError) until the check has run, and a missing store is not
    created until then (reads answer IndexUnavailableError). ``read_committed(timeout_s)``: the
    group's committed offsets, or None when the broker does not answer (default: ask ``servers``
    for ``group``'s)."""

    def __init__(
        self,
        data_dir: Path,
        shard: int,
        model: str,
        index: str,
        servers: str,
        group: str,
        read_committed: Callable[[float], Offsets | None] | None = None,
    ) -> None:
        self.shard, self._model, self._index = shard, model, index
        self._path = topology.shard_directory(data_dir, shard)
        self._read_committed = read_committed or functools.partial(_committed_or_none, servers, group)
        self.problem: str | None = None
        self._store: GraphStore | None = None
        self._checked = self._check(self._read_committed(30.0))
        if not self._checked and (self._path / GRAPH_DB_NAME).exists():
            self._store = GraphStore(self._path, model)  # reads unchecked; writes wait for the check

    def _check(self, committed: Offsets | None) -> bool:
        """Checks the store against ``committed`` and opens it when it holds all of that; False
        when the offsets are unknown (None)."""
        if committed is None:
            return False
        applied = applied_offsets(self._path / GRAPH_DB_NAME)
        self.problem = committed_problem(self._index, self.shard, self._path, applied, committed)
        if self.problem is not None:
            log.error("%s", self.problem)
            if self._store is not None:  # opened unchecked: it holds less than was committed
                self._store.close()
                self._store = None
        elif self._store is None:
            self._store = GraphStore(self._path, self._model)
        return True

    def _open(self) -> GraphStore:
        if self._store is None:
            raise IndexUnavailableError(
                self.problem
                or f"graph shard {self.shard} has no store yet, and cannot create one before it is "
                "checked against the committed offsets (the broker did not answer)"
            )
        return self._store

    # the store's methods, each through the check
    def apply(self, write: ShardWrite[ChunkGraph]) -> WriteResult:
        if not self._checked:
            self._checked = self._check(self._read_committed(5.0))
            if not self._checked:
                raise RetryableError(
                    f"graph shard {self.shard}: its store is not checked against the committed offsets "
                    "yet (the broker did not answer); writes wait until it is"
                )
        return self._open().apply(write)

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        return self._open().get_document_rows(document_ids)

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        return self._open().get_document_versions(document_ids)

    def around(self, keys: Sequence[str]) -> nx.MultiDiGraph:
        return self._open().around(keys)

    def describe(self, keys: Sequence[str]) -> nx.MultiDiGraph:
        return self._open().describe(keys)

    def known(self, candidates: Sequence[str]) -> dict[str, str]:
        return self._open().known(candidates)

    def search(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        return self._open().search(prefix, limit)

    def mentions(self, keys: Sequence[str], limit: int) -> dict[str, list[dict[str, Any]]]:
        return self._open().mentions(keys, limit)

    def chunk_ids(self) -> list[str]:
        return self._open().chunk_ids()

    def chunk_graphs(self, chunk_ids: Sequence[str]) -> list[ChunkGraph | None]:
        return self._open().chunk_graphs(chunk_ids)

    def document_count(self) -> int:
        return self._open().document_count()

    def stats(self) -> dict[str, int]:
        return self._open().stats()

    def offsets(self) -> Offsets:
        return self._open().offsets()

    def ping(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def open_graph_shards(settings: Settings) -> list[Any]:
    """Starts (or gets) the shard actors of ``settings``' knowledge graph, when an ingest built one:
    the extraction model its stores record. ``[]`` when it has none (graph queries answer 503)."""
    side = settings.graph_side()
    for shard in range(side.index.n_shards):
        model = recorded_graph_model(topology.shard_directory(side.data_dir, shard))
        if model is not None:
            return graph_shard_handles(side, model)
    return []


def graph_shard_handles(
    side: Settings, model: str, servers: str | None = None, timeout_s: float | None = None
) -> list[Any]:
    """Gets or creates the detached shard actors of a knowledge graph (``side``: the index's
    :meth:`~schemas.settings.Settings.graph_side`), placed as :func:`shard_handles` places vector
    shards (soft node affinity: a restart stays where the store is); ``servers`` and
    ``timeout_s`` as there."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    handles: list[Any] = [
        ray.remote(GraphShardActor)
        .options(
            name=actor_name(side.index.name, "shard", i),
            namespace=side.ray.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=SHARD_CPUS,
            max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True),
            **_RESTART,
        )
        .remote(
            side.data_dir, i, model, side.index.name, servers or bootstrap_servers(side), side.consumer_group
        )
        for i in range(side.index.n_shards)
    ]
    ray.get([h.ping.remote() for h in handles], timeout=timeout_s)
    return handles


def images_enabled(settings: Settings) -> bool:
    """Whether an ingest consumes the images topic: ``images.ingest``; ``auto`` means when the
    image model is there (Riverbed's own model once trained; any other id or path always).
    ConfigError when ``images.ingest`` is true and the model is not there."""
    if settings.images.ingest is False:
        return False
    try:
        resolve_image_model(settings.images, settings.embed.model, settings.cache_dir)
    except ConfigError as exc:
        if settings.images.ingest is True:
            raise
        log.warning("images topic not consumed (images.ingest is auto): %s", exc)
        return False
    return True


class ShardActor(IndexShard):
    """An index shard as a detached actor. Each (re)start reads the consumer group's committed
    offsets first: a shard whose store holds less than was committed (its data is on another node,
    or lost) refuses to serve or write instead of silently answering from an empty store. When the
    broker cannot be asked then, an existing store serves reads, but writes wait (retryably) until
    the check has run, and a missing store is not created until then."""

    def __init__(self, config: IndexConfig, data_dir: Path, shard: int, model: str, dim: int,
                 index: str, servers: str, group: str) -> None:  # fmt: skip
        committed = _committed_or_none(servers, group)
        super().__init__(config, data_dir, shard, model, dim, index_name=index, committed=committed)
        self._servers, self._group = servers, group
        self._checked = committed is not None
        if self._checked or self.has_store():
            self.warm_up()

    def apply(self, write: ShardWrite) -> WriteResult:
        if not self._checked:
            committed = _committed_or_none(self._servers, self._group, timeout_s=5)
            if committed is None:
                raise RetryableError(
                    f"shard {self.shard}: its store is not checked against the committed offsets yet "
                    "(the broker did not answer); writes wait until it is"
                )
            self.check_committed(committed)
            self._checked = True
            self.warm_up()
        return super().apply(write)

    def ping(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def reader_source(self) -> dict[str, str] | None:
        """:meth:`IndexShard.reader_source`, with this actor's Ray node: only a reader on the same
        node may read the store (SQLite's WAL shares memory between the processes of one host,
        so it must never be read from another host, even through a shared volume)."""
        source = super().reader_source()
        return None if source is None else {**source, "node": self.node()}


def _committed_or_none(servers: str, group: str, timeout_s: float = 30.0) -> Offsets | None:
    """The group's committed offsets, or None when the broker cannot be asked now (then the shard
    opens without the check, and says so)."""
    try:
        return committed_offsets(servers, group, timeout_s=timeout_s)
    except Exception as exc:  # any broker trouble: serving what the store holds beats not serving
        log.warning("committed offsets of %s unavailable (%s): shard opens unchecked", group, exc)
        return None


class RayDownstream:
    """:class:`actors.processor.Downstream` over actor handles.

    Ray's transport failures (a dead, restarting or unreachable actor, a timeout, a lost object)
    become :class:`RetryableError`; an error the actor's own code raised arrives as Ray's task
    error, which is also an instance of its cause's class, and is classified by that cause.

    The shard handles come from ``find_shards`` (which finds the shards by name, or creates any
    that is gone, from its data on disk) on the first call that needs them: a source can then be
    built while the embedder still loads the model that the shards are made for. ``find_shards``
    is asked again when a shard actor is dead for good (killed without a restart), since its
    handle never works again.
    """

    def __init__(
        self,
        embedders: Sequence[Any],
        n_shards: int,
        find_shards: Callable[[], Sequence[Any]],
    ) -> None:
        self.embedders = list(embedders)
        self.n_shards = n_shards
        self.find_shards = find_shards
        self._shards: list[Any] | None = None
        self._next = 0

    @property
    def shards(self) -> list[Any]:
        if self._shards is None:
            try:
                found = list(self.find_shards())
            except Exception as exc:  # never the records' fault: the consumer retries, whatever it is
                raise RetryableError(f"finding the shard actors failed: {exc!r}") from exc
            if len(found) != self.n_shards:
                raise RetryableError(f"found {len(found)} shard actors for {self.n_shards} shards")
            self._shards = found
        return self._shards

    def embed(self, inputs: list[Any]) -> Future[np.ndarray]:
        embedder = self.embedders[self._next % len(self.embedders)]
        self._next += 1
        inner = embedder.embed.remote(inputs).future()
        outer: Future[np.ndarray] = Future()

        def done(f: Future[np.ndarray]) -> None:
            try:
                outer.set_result(f.result())
            except Exception as exc:
                outer.set_exception(_transport_retryable(exc, "embedder"))

        inner.add_done_callback(done)
        return outer

    def stored(self, document_ids: Sequence[str]) -> dict[str, StoredDocument]:
        """Registry rows from each id's registry shard and versions from every shard, in one call
        per shard."""
        by_shard: dict[int, list[str]] = {}
        for doc_id in document_ids:
            by_shard.setdefault(shard_of(doc_id, self.n_shards), []).append(doc_id)
        ids = list(document_ids)
        calls = [self.shards[i].get_document_rows.remote(r) for i, r in by_shard.items()]
        calls += [shard.get_document_versions.remote(ids) for shard in self.shards]
        parts = self._get(calls, "reading stored documents")
        rows: dict[str, DocumentRow] = {}
        for part in parts[: len(by_shard)]:
            rows.update(part)
        return merge_stored(ids, rows, parts[len(by_shard) :])

    def write(self, writes: Mapping[int, ShardWrite]) -> dict[int, WriteResult]:
        shards = list(writes)
        results = self._get([self.shards[i].apply.remote(writes[i]) for i in shards], "shard write")
        return dict(zip(shards, results, strict=True))

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return list(ray.get(refs, timeout=SHARD_CALL_TIMEOUT_S))
        except Exception as exc:
            if isinstance(exc, ActorDiedError):
                self._revive(exc)
            raise _transport_retryable(exc, what) from exc

    def _revive(self, cause: BaseException) -> None:
        """A shard actor is dead for good: the handles are found again (``find_shards``) by the
        next call, which the consumer retries."""
        log.warning("a shard actor is dead (%s); finding or re-creating the index's shards", cause)
        self._shards = None


def _transport_retryable(exc: BaseException, what: str) -> BaseException:
    """``exc`` as the stream consumer should see it: Ray's own failures are transient."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(exc, RayError) and not isinstance(exc, RayTaskError):
        return RetryableError(f"{what} failed: {exc}")
    return exc


class SourceActor:
    """One stream consumer: of the documents topic (``kind`` ``document``, in the index's group), of
    the images topic (``image``, in the group of ``settings.image_side()``), or of the documents
    topic for the knowledge graph (``graph``, in the group of ``settings.graph_side()``)."""

    def __init__(
        self, settings: Settings, servers: str, downstream: RayDownstream, name: str, kind: str = "document"
    ) -> None:
        wait_s, timeout_s = settings.embed.max_wait_ms / 1000, settings.ingest.embed_timeout_s
        self.kind = kind
        if kind == "graph":
            self.source = graph_consumer(
                settings.kafka,
                settings.ingest,
                settings.chunk,
                settings.embed.model,
                servers,
                settings.graph_side().consumer_group,
                downstream,
                name=name,
                max_wait_s=wait_s,
                embed_timeout_s=timeout_s,
            )
        elif kind == "image":
            self.source = image_consumer(
                settings.kafka,
                settings.ingest,
                settings.images,
                servers,
                settings.image_side().consumer_group,
                downstream,
                name=name,
                max_wait_s=wait_s,
                embed_timeout_s=timeout_s,
            )
        else:
            self.source = document_consumer(
                settings.kafka,
                settings.ingest,
                settings.chunk,
                settings.embed.model,
                servers,
                settings.consumer_group,
                downstream,
                name=name,
                max_wait_s=wait_s,
                embed_timeout_s=timeout_s,
            )
        self.source.warm_up()

    def run(self) -> dict[str, Any]:
        return self.source.run()

    def stop(self) -> None:
        self.source.stop()

    def stats(self) -> dict[str, Any]:
        """The consumer's counters, and ``kind``: which stream it reads (see the class)."""
        return {**self.source.stats(), "kind": self.kind}

    def ping(self) -> int:
        return os.getpid()


@dataclass(frozen=True)
class Progress:
    committed: dict[str, dict[int, int]]
    ends: dict[str, dict[int, int]]
    sources: list[dict[str, Any]]
    elapsed_s: float
    graph: tuple[str, dict[str, dict[int, int]]] | None = None
    """When the knowledge graph is built: the topic it reads and its group's committed offsets."""

    @property
    def lag(self) -> int:
        """Records not yet committed, by every group this run consumes with."""
        lag = topology.lag(self.ends, self.committed)
        if self.graph is not None:
            topic, committed = self.graph
            lag += topology.lag({topic: self.ends.get(topic, {})}, committed)
        return lag

    def total(self, key: str, kind: str | None = None) -> int:
        """``key`` summed over the sources (of one ``kind``: ``document``, ``image``, ``graph``).
        The graph's source counts documents and chunks too: the text's own are ``kind="document"``."""
        return sum(int(s.get(key, 0)) for s in self.sources if kind is None or s.get("kind") == kind)

    def dead_letters(self) -> int:
        return sum(sum(s.get("dead_letters", {}).values()) for s in self.sources)


def shard_handles(
    settings: Settings, model: str, dim: int, servers: str | None = None, timeout_s: float | None = None
) -> list[Any]:
    """Gets or creates the detached shard actors of ``settings.index`` (``servers``: the broker
    they check their committed offsets with, by default the settings'), and waits until each
    answers (at most ``timeout_s``, by default as long as it takes).

    A new shard is placed on a node (spread over the cluster's alive nodes, by shard number) with
    soft affinity: a crashed shard restarts on that node, where its store is; only when the node is
    gone does it start elsewhere, where it refuses to serve unless its store is there too (a shared
    volume), since its own committed offsets say what it must hold.
    """
    cls = ray.remote(ShardActor)
    # A shard actor has a fraction of a CPU: FAISS's default of one OpenMP thread per core made a
    # single flat query ~70x slower on a 2-core machine (threads fighting the embedder's).
    faiss_config = settings.index.faiss
    if faiss_config.omp_threads is None:
        faiss_config = faiss_config.model_copy(update={"omp_threads": 1})
    index_config = settings.index.model_copy(update={"faiss": faiss_config})
    servers = servers or bootstrap_servers(settings)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    handles: list[Any] = [
        cls.options(
            name=actor_name(settings.index.name, "shard", i),
            namespace=settings.ray.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=SHARD_CPUS,
            max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True),
            **_RESTART,
        ).remote(
            index_config,
            settings.data_dir,
            i,
            model,
            dim,
            settings.index.name,
            servers,
            settings.consumer_group,
        )
        for i in range(settings.index.n_shards)
    ]
    ray.get([h.ping.remote() for h in handles], timeout=timeout_s)
    return handles


def described_shards(side: Settings, embedder: Any, servers: str, graph: bool = False) -> list[Any]:
    """The shard actors of ``side`` for the model its ``embedder`` describes (for a knowledge
    graph, ``graph``: its extractor's model): found by name, or created from their data on disk,
    with the broker at ``servers`` (a source never starts one). Waits for the embedder to load its
    model, and for each shard at most ``SHARD_CALL_TIMEOUT_S`` (then raises)."""
    info = ray.get(embedder.describe.remote(), timeout=SHARD_CALL_TIMEOUT_S)
    if graph:
        return graph_shard_handles(side, str(info["model"]), servers, timeout_s=SHARD_CALL_TIMEOUT_S)
    return shard_handles(side, str(info["model"]), int(info["dim"]), servers, timeout_s=SHARD_CALL_TIMEOUT_S)


def _downstream(side: Settings, embedders: Sequence[Any], servers: str, graph: bool = False) -> RayDownstream:
    """A source's downstream: ``embedders``, and ``side``'s shards found on first use."""
    return RayDownstream(
        embedders,
        side.index.n_shards,
        functools.partial(described_shards, side, embedders[0], servers, graph),
    )


def running_source(settings: Settings) -> str | None:
    """The name of a live source actor of the index (an ingest is running), or None."""
    for i in range(settings.ingest.sources):
        name = actor_name(settings.index.name, "source", i)
        try:
            ray.get_actor(name, namespace=settings.ray.namespace)
        except ValueError:
            continue
        return name
    return None


def live_ingest_actors(settings: Settings) -> list[str]:
    """The names of an ingest run's own actors (sources and embedders, of the text, image and graph
    sides) that are alive: while any is, a new run of the index would share them by name."""
    sides = [
        (settings, settings.ingest.sources, settings.embed.workers),
        (settings.image_side(), 1, 1),
        (settings.graph_side(), 1, settings.graph.extractors),
    ]
    names = [
        name
        for side, sources, embedders in sides
        for name in [actor_name(side.index.name, "source", i) for i in range(sources)]
        + [actor_name(side.index.name, "embedder", i) for i in range(embedders)]
    ]
    live = []
    for name in names:
        try:
            ray.get_actor(name, namespace=settings.ray.namespace)
        except ValueError:
            continue
        live.append(name)
    return live


def named_shards(settings: Settings) -> list[Any]:
    """The index's live shard actors, found by name (raises ``ValueError`` naming one not running)."""
    handles = []
    for i in range(settings.index.n_shards):
        name = actor_name(settings.index.name, "shard", i)
        try:
            handles.append(ray.get_actor(name, namespace=settings.ray.namespace))
        except ValueError:
            raise ValueError(f"shard actor {name} is not running") from None
    return handles


def release_shards(settings: Settings, timeout_s: float = 60.0) -> int:
    """Stops the index's shard actors; how many were running. They are detached (they outlive the
    command that started them, for `serve`); their data stays on disk and :func:`shard_handles`
    starts them again. Never call it on an index another command is serving.

    Returns once every stopped actor's name is free: a kill takes effect a moment after it is
    sent, and a :func:`shard_handles` in between would get the dying actor back by its name (whose
    calls then fail), and its store may still be open while the caller removes or copies it."""
    namespace = settings.ray.namespace
    stopped = []
    for i in range(settings.index.n_shards):
        name = actor_name(settings.index.name, "shard", i)
        try:
            ray.kill(ray.get_actor(name, namespace=namespace))
        except ValueError:  # not running
            continue
        stopped.append(name)
    deadline = time.monotonic() + timeout_s
    for name in stopped:
        while True:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:  # gone
                break
            if time.monotonic() > deadline:
                raise IndexUnavailableError(
                    f"shard actor {name!r} still runs {timeout_s:.0f} s after it was killed; "
                    "see `ray list actors` and try again"
                )
            time.sleep(0.1)
    return len(stopped)


def drop_index(settings: Settings, topics: Sequence[str]) -> None:
    """Removes a throwaway index (benchmarks): its shard actors, its data and ``topics`` (those the
    caller created for it; never a topic other indexes share, such as the default dead letters)."""
    import shutil

    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    release_shards(settings)
    backend = backend_for(settings.index)
    for shard in range(settings.index.n_shards):
        path = topology.shard_directory(settings.data_dir, shard)
        try:
            backend.drop(settings.index, path, index_name=settings.index.name, shard=shard)
        except RiverbedError as exc:  # a server out of reach: its collections stay
            log.warning("shard %d of index %s not dropped: %s", shard, settings.index.name, exc)
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(settings), client_id="riverbed-admin")
    except (KafkaError, OSError) as exc:
        log.warning("topics of index %s not deleted: %s", settings.index.name, exc)
        return
    try:
        existing = set(admin.list_topics())
        gone = [t for t in topics if t in existing]
        if gone:
            admin.delete_topics(gone)
    except (KafkaError, OSError) as exc:
        log.warning("topics of index %s not deleted: %s", settings.index.name, exc)
    finally:
        admin.close()


class GraphModelChangedError(ConfigError):
    """The knowledge graph's stores were built by another extraction model (or extraction
    version) than the one configured now: the graph is to be reset and built again."""


def reset_graph(settings: Settings) -> dict[str, Any]:
    """Forgets ``settings``' knowledge graph so that the next ingest with ``graph.enabled`` builds
    it again from the documents topic (what another extraction model, or a lost store, needs):
    deletes the graph's consumer group, stops its shard actors where a Ray cluster is up, and
    removes its stores under this machine's data directory. The text index and its group are left
    as they are. ConfigError, before anything is removed, while an ingest is reading in the group.
    Returns what was done: ``group`` (deleted, or already absent), ``actors_stopped``, ``removed``."""
    import shutil

    from kafka import KafkaAdminClient

    side = settings.graph_side()
    group = side.consumer_group
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(settings), client_id="riverbed-admin")
    try:
        outcome = admin.delete_groups([group])[group]  # "OK", or the error's class name
    finally:
        admin.close()
    if outcome == "NonEmptyGroupError":
        raise ConfigError(
            f"an ingest is reading in the graph's consumer group {group!r}: stop it, then reset the graph"
        )
    if outcome not in ("OK", "GroupIdNotFoundError"):
        raise RetryableError(f"deleting the graph's consumer group {group!r}: {outcome}")
    try:
        connect(settings, start=False)
    except ConfigError:  # no Ray cluster: no shard actor is running
        stopped = 0
    else:
        stopped = release_shards(side)
    removed = side.data_dir.exists()
    if removed:
        shutil.rmtree(side.data_dir)
    return {
        "index": settings.index.name,
        "group": "deleted" if outcome == "OK" else "absent",
        "actors_stopped": stopped,
        "removed": str(side.data_dir) if removed else None,
    }


class Pipeline:
    """One ingest run: start the actors, watch progress, stop cleanly."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servers = ""
        self.embedders: list[Any] = []
        self.shards: list[Any] = []
        self.sources: list[Any] = []
        self.images = False
        """Whether this run consumes the images topic too (:func:`images_enabled`)."""
        self.image_embedders: list[Any] = []
        self.image_shards: list[Any] = []
        self.extractors: list[Any] = []
        self.graph_shards: list[Any] = []
        self._runs: list[Any] = []
        self._owned = False
        """Whether :meth:`start` created the run's first source (see :meth:`_abandon`)."""
        self._t0 = time.monotonic()
        self.startup: dict[str, float] = {}
        """Seconds each step of :meth:`start` took, in order (``ray``: connecting, or starting the
        local head; ``topics``: the broker, local or not, and the topics; ``graph_extractor``,
        ``embedder`` (loading the model; the sources are built meanwhile), ``shards``,
        ``image_side``): where a cold start goes. The sources are not waited for (they finish
        building and join their groups in the background; :meth:`progress` shows their
        assignments)."""

    def _lap(self, step: str, since: float) -> float:
        now = time.monotonic()
        self.startup[step] = round(now - since, 2)
        return now

    # START
    def start(self) -> None:
        """Starts the run's actors, each side's (text, images, knowledge graph) at once where it
        can: the sources are built (the processor loaded, the dead-letter producer open) while the
        embedders load their models, and find their shards when they first need them; the shards are
        created here as soon as the embedder says which model and dimension they hold. No source
        reads a record before every shard is up. When a step fails, the actors this run started
        are stopped (the shards, shared with serving, stay) and the error is raised."""
        s = self.settings
        began = time.monotonic()
        connect(s)
        lap = self._lap("ray", began)
        self.servers = bootstrap_servers(s)
        ensure_topics(self.servers, topic_specs(s.kafka.topics), max_message_bytes=s.kafka.max_record_bytes)
        lap = self._lap("topics", lap)
        source = running_source(s)
        if source is not None:
            raise ConfigError(
                f"an ingest is already running for index {s.index.name!r} (actor {source} exists); "
                "stop it first"
            )
        self.images = images_enabled(s)
        try:
            self._start_actors(lap)
        except BaseException:
            self._abandon()
            raise
        self._runs = [src.run.remote() for src in self.sources]
        self._t0 = time.monotonic()
        log.info(
            "pipeline started in %.1f s (%s)",
            self._t0 - began,
            ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.startup.items()),
        )

    def _start_actors(self, lap: float) -> None:
        s = self.settings
        if s.graph.enabled:
            self._launch_extractors()
        cpus = embed_cpus(s)
        embed_config = s.embed.model_copy(update={"num_cpus": cpus})
        embedder_cls = ray.remote(EmbedderActor)
        for i in range(s.embed.workers):  # one at a time, so that a failure leaves the others listed
            self.embedders.append(
                embedder_cls.options(
                    name=actor_name(s.index.name, "embedder", i),
                    namespace=s.ray.namespace,
                    get_if_exists=True,
                    num_cpus=cpus,
                    num_gpus=s.embed.num_gpus,
                    **_RESTART,
                ).remote(embed_config)
            )
        for i in range(s.ingest.sources):
            downstream = _downstream(s, self.embedders, self.servers)
            self.sources.append(self._source(actor_name(s.index.name, "source", i), downstream, "document"))
            self._owned = True  # the name was free: no other run of the index shares these actors
        if self.images:
            self._launch_images()
        graph_model = None
        if s.graph.enabled:
            side = s.graph_side()
            downstream = _downstream(side, self.extractors, self.servers, graph=True)
            self.sources.append(self._source(actor_name(side.index.name, "source", 0), downstream, "graph"))
            graph_model = self._graph_model()
            lap = self._lap("graph_extractor", lap)
        info = _await_embedder(s, self.embedders[0], cpus)
        log.info("embedder: %s (dim %d) on %s", info["model"], info["dim"], info["device"])
        lap = self._lap("embedder", lap)
        self.shards = shard_handles(s, info["model"], info["dim"])
        lap = self._lap("shards", lap)
        if self.images:
            side = s.image_side()
            info = _await_embedder(side, self.image_embedders[0], IMAGE_EMBED_CPUS)
            log.info("image embedder: %s (dim %d)", info["model"], info["dim"])
            self.image_shards = shard_handles(side, info["model"], info["dim"])
            lap = self._lap("image_side", lap)
        if graph_model is not None:
            self.graph_shards = graph_shard_handles(s.graph_side(), graph_model)

    def _abandon(self) -> None:
        """Stops the actors a failed :meth:`start` started (not the shards: serving shares them).
        The embedders and extractors (found by name, or created) only when this start created its
        first source: when that name was taken, another run of the index started at the same
        moment, and they are its own."""
        shared = self.embedders + self.image_embedders + self.extractors if self._owned else []
        for actor in self.sources + shared:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("stopping %s: %s", actor, exc)
        self.sources, self.embedders, self.image_embedders, self.extractors = [], [], [], []
        self._owned = False

    def _launch_images(self) -> None:
        """The image embedder and one source of the images topic (its shards: :meth:`start`)."""
        s, side = self.settings, self.settings.image_side()
        self.image_embedders = [
            ray.remote(ImageEmbedderActor)
            .options(**image_embedder_options(s))
            .remote(s.images, s.embed.model, s.cache_dir)
        ]
        downstream = _downstream(side, self.image_embedders, self.servers)
        self.sources.append(self._source(actor_name(side.index.name, "source", 0), downstream, "image"))

    def _launch_extractors(self) -> None:
        """The knowledge graph's extractors (:meth:`_graph_model` waits for them)."""
        s, side = self.settings, self.settings.graph_side()
        for i in range(s.graph.extractors):
            self.extractors.append(
                ray.remote(ExtractorActor)
                .options(
                    name=actor_name(side.index.name, "embedder", i),
                    namespace=side.ray.namespace,
                    get_if_exists=True,
                    num_cpus=GRAPH_EXTRACT_CPUS,
                    **_RESTART,
                )
                .remote(s.graph)
            )

    def _graph_model(self) -> str:
        """The extraction model the graph's extractors run (its description), once they are up.
        :class:`GraphModelChangedError` when the graph's stores were built by another one: before
        any source reads a record."""
        s, side = self.settings, self.settings.graph_side()
        model = str(_await_embedder(side, self.extractors[0], GRAPH_EXTRACT_CPUS)["model"])
        log.info("graph extractor: %s", model)
        for shard in range(side.index.n_shards):
            recorded = recorded_graph_model(topology.shard_directory(side.data_dir, shard))
            if recorded and recorded != model:
                raise GraphModelChangedError(
                    f"the knowledge graph of index {s.index.name!r} was built by {recorded!r}, but the "
                    f"extraction now is {model!r}: another model means another graph (`riverbed graph "
                    "reset --yes`, then ingest again, rebuilds it from the topic)"
                )
        return model

    def _source(self, name: str, downstream: RayDownstream, kind: str) -> Any:
        return (
            ray.remote(SourceActor)
            .options(
                name=name,
                namespace=self.settings.ray.namespace,
                num_cpus=LIGHT_CPUS,
                max_concurrency=4,
                **_RESTART,
            )
            .remote(self.settings, self.servers, downstream, name, kind)
        )

    # WATCH
    def progress(self) -> Progress:
        """Committed offsets and topic ends of every stream this run consumes (documents; images
        when on), and each source's counters."""
        s = self.settings
        try:
            stats = ray.get([src.stats.remote() for src in self.sources], timeout=10)
        except (RayError, TimeoutError):
            stats = []
        committed = committed_offsets(self.servers, s.consumer_group)
        topics = [s.kafka.topics.documents]
        if self.images:
            committed.update(committed_offsets(self.servers, s.image_side().consumer_group))
            topics.append(s.kafka.topics.images)
        graph = None
        if self.graph_shards:
            graph = (s.kafka.topics.documents, committed_offsets(self.servers, s.graph_side().consumer_group))
        return Progress(
            committed=committed,
            ends=end_offsets(self.servers, topics),
            sources=stats,
            elapsed_s=time.monotonic() - self._t0,
            graph=graph,
        )

    def wait_consuming(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> None:
        """Returns once every source is warmed up (its processor loaded, its dead-letter producer
        open) and has partitions assigned: what a benchmark waits for before it starts the clock.
        With more sources than partitions some never get one; then it returns at ``timeout_s``."""
        from ray.exceptions import GetTimeoutError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:  # a source still in its constructor answers once it is built
                stats = ray.get([src.stats.remote() for src in self.sources], timeout=30)
            except GetTimeoutError:
                continue
            if all(s["phase"] != "starting" and s["assignment"] for s in stats):
                return
            time.sleep(poll_s)
        log.warning("not every source has partitions after %g s; going on", timeout_s)

    def check_alive(self) -> None:
        ready, _ = ray.wait(self._runs, timeout=0, num_returns=len(self._runs))
        for ref in ready:
            ray.get(ref)  # raises the source's error, if it failed

    def wait_idle(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        timeout_s: float | None = None,
        interval_s: float = 1.0,
    ) -> Progress:
        """Returns once every record on the topics this run consumes is processed and committed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.check_alive()
            progress = self.progress()
            if on_progress is not None:
                on_progress(progress)
            if progress.lag == 0 and all(s.get("in_flight_batches", 0) == 0 for s in progress.sources):
                return progress
            if deadline is not None and time.monotonic() > deadline:
                raise RetryableError(
                    f"ingest not idle after {timeout_s} s (lag {progress.lag}; committed "
                    f"{progress.committed}, ends {progress.ends}; sources {progress.sources})"
                )
            time.sleep(interval_s)

    # STOP
    def stop(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Stops the sources (they finish and commit their in-flight batches), then snapshots the
        shards and releases the embedders. Shards stay up for `serve`."""
        for src in self.sources:
            src.stop.remote()
        results: list[dict[str, Any]] = []
        try:
            results = ray.get(self._runs, timeout=timeout_s)
        finally:
            for actor in self.sources + self.embedders + self.image_embedders + self.extractors:
                ray.kill(actor, no_restart=True)
            if self.shards:  # by name: a source may have re-created a shard (new handle)
                ray.get([sh.snapshot.remote() for sh in named_shards(self.settings)])
            if self.image_shards:
                ray.get([sh.snapshot.remote() for sh in named_shards(self.settings.image_side())])
            self.sources, self.embedders, self.image_embedders, self._runs = [], [], [], []
            self.extractors = []
        return results


def _await_embedder(
    settings: Settings, embedder: Any, cpus: float, patience_s: float = 30.0
) -> dict[str, Any]:
    """The embedder's ``describe()``. On a local head (a fixed size), an embedder still waiting for
    resources after ``patience_s`` is killed and refused with a :class:`ConfigError` naming who
    holds them; on a cluster (which may scale up) and while the model loads, it waits."""
    from ray.exceptions import GetTimeoutError

    from cluster.ray_actors import actor_rows, cpu_holders_now

    ref = embedder.describe.remote()
    name = actor_name(settings.index.name, "embedder", 0)
    while True:
        try:
            return dict(ray.get(ref, timeout=patience_s))
        except GetTimeoutError:
            rows = actor_rows(settings.ray.namespace)
            waiting = any(r.name == name and r.state == "PENDING_CREATION" for r in rows)
            if not waiting or settings.ray.address:
                continue
            # PENDING_CREATION also covers an embedder whose CPUs are granted while its worker
            # process starts (slow on a loaded machine): refuse only when the others' actors
            # leave too few CPUs for it, or the head never had enough.
            others = sum(r.cpus for r in rows if r.holds and r.name != name)
            if ray.cluster_resources().get("CPU", 0.0) - others >= cpus:
                continue
            ray.kill(embedder)
            free = ray.available_resources().get("CPU", 0.0)
            raise ConfigError(
                f"the embedder of index {settings.index.name!r} needs {cpus:g} logical CPUs "
                f"(embed.num_cpus) but {free:g} are free after {patience_s:g} s; held by "
                f"{cpu_holders_now(settings.ray.namespace)}: stop the other index's ingest or serve, "
                "or lower embed.num_cpus"
            ) from None


def ingest_documents(settings: Settings, documents: Sequence[Any]) -> None:
    """Produces ``documents`` (envelopes) to the index's documents topic and runs the pipeline
    until every record is committed, showing progress on stderr. For benchmarks and evaluations."""
    import sys

    from cluster.producer import produce_all

    servers = bootstrap_servers(settings)
    ensure_topics(
        servers, topic_specs(settings.kafka.topics), max_message_bytes=settings.kafka.max_record_bytes
    )
    produce_all(servers, settings.kafka.topics.documents, documents, settings.kafka.max_record_bytes)
    print(f"ingesting {len(documents)} documents into index {settings.index.name}", file=sys.stderr)
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        pipeline.wait_idle(
            on_progress=lambda p: print(
                f"\r  chunks {p.total('chunks', 'document')}  lag {p.lag}   ",
                end="",
                file=sys.stderr,
                flush=True,
            ),
            interval_s=1.0,
        )
    finally:
        pipeline.stop()
        print(file=sys.stderr)
