"""What the stream consumer needs from the stages after it, and from one processor per record kind.

The :class:`~actors.stream_consumer.StreamConsumer` knows Kafka (poll, batch, rebalance, commit,
dead letters, retries) and nothing of what a record means. A :class:`Processor` knows one kind of
envelope (``document``, ``image``) and nothing of Kafka: it turns the last change of each id in a
batch into a :class:`Unit` (inputs to embed: texts, images; and what to write once their vectors
exist), and units into shard writes. The :class:`Downstream` is the embedders and the shards of
that kind (Ray actors in the pipeline, in-process objects in tests): the consumer hands it the
inputs as the processor made them, and never looks inside.

Failures: a processor reports a record it cannot take in :meth:`Processor.prepare` (with its
reason), and raises ``ValueError`` (or :class:`~schemas.errors.ProcessingError`) from
:meth:`Processor.writes` for data that can never be written; the consumer then isolates the record
that causes it and dead-letters it alone. :class:`~schemas.errors.RetryableError` means "try again
later".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from actors.vector_index import DocumentRow, ShardWrite, WriteResult
from schemas.envelope import DocumentEnvelope, ImageEnvelope
from schemas.errors import PoisonMessageError
from schemas.ids import shard_of
from schemas.topology import Version

Failure = str | PoisonMessageError
"""Why a record cannot be processed: a message (``processing_error``), or an error with its own
dead-letter reason (``invalid_image``...)."""


@dataclass(frozen=True)
class Record:
    """One Kafka record as polled: where it sits and its raw bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def version(self) -> Version:
        return (self.topic, self.partition, self.offset)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class Item:
    """The last change of one id in a batch: its record and its validated envelope."""

    record: Record
    envelope: DocumentEnvelope | ImageEnvelope

    @property
    def id(self) -> str:
        return self.envelope.id


@dataclass
class Unit:
    """A processor's work for one item: ``inputs`` to embed (texts, images: what its downstream's
    embedder takes; none for deletes and unchanged content), and ``payload``, private to the
    processor, from which it makes the writes. The consumer sets ``vectors`` (one row per input)
    before asking for the writes."""

    item: Item
    inputs: list[Any]
    payload: Any
    vectors: np.ndarray | None = None
    counts: dict[str, int] = field(default_factory=dict)
    """What writing this unit adds to the consumer's counters (``{"documents": 1, "chunks": 3}``)."""


@dataclass(frozen=True)
class StoredDocument:
    """What the shards hold of one id: its registry row (None: not indexed), and whether a write
    of it is in progress (some shard holds a newer version than the row: a crash between writing
    chunks and the row, or a batch still in flight). Content in progress is never "unchanged"."""

    row: DocumentRow | None
    in_progress: bool = False

    def holds(self, content_hash: str) -> bool:
        """Whether the shards hold exactly this content, completely written: an upsert of it needs
        no embedding (its version is still written)."""
        return self.row is not None and not self.in_progress and self.row.content_hash == content_hash


@dataclass(frozen=True)
class Writes:
    """The two phases of a set of units, per shard. Phase 1 (chunks, truncations, deletes, each
    document's version on every shard) is durable before phase 2 (the registry rows) is sent, so
    a registry row never claims content the shards do not hold."""

    phase1: dict[int, ShardWrite]
    phase2: dict[int, ShardWrite]


@dataclass(frozen=True)
class Change:
    """What writing a unit changes of one id, at ``version`` (the record it comes from): with no
    ``row``, a deletion; else the id's registry row (content hash, chunk count) and its chunks to
    upsert, none when its content is unchanged (its version, truncation and row are still written,
    so an older record of it can never land later)."""

    document_id: str
    version: Version
    row: DocumentRow | None = None
    records: Sequence[Any] = ()
    """What the shards upsert by chunk id: :class:`ChunkRecord` for vector shards (a graph shard's
    records are its own)."""


def deletion(item: Item) -> Unit:
    """The unit of a delete (``op: delete``, or a tombstone): nothing to embed; its payload is its
    :class:`Change`."""
    return Unit(item, [], Change(item.id, item.record.version), counts={"deletes": 1})


Route = Callable[[Any, int], Iterable[tuple[int, Any]]]
"""``route(record, n_shards)``: the shards a record goes to, each with the record it gets there."""


def by_chunk_id(record: Any, n_shards: int) -> Iterable[tuple[int, Any]]:
    """The vector shards' routing: the whole record to ``shard_of(chunk_id)``."""
    return [(shard_of(record.chunk_id, n_shards), record)]


def two_phase_writes(changes: Iterable[Change], n_shards: int, route: Route = by_chunk_id) -> Writes:
    """The :class:`Writes` of ``changes``: phase 1 sends every shard the chunks routed to it
    (``route``; by default ``shard_of(chunk_id)``), every id's truncation (``row.n_chunks``: stale
    tail chunks of a shorter new version go) or deletion, and every id's version; phase 2 sends each
    row to the id's registry shard, ``shard_of(document_id)``, with its version."""
    chunks: dict[int, list[Any]] = {i: [] for i in range(n_shards)}
    truncate: dict[str, int] = {}
    deletes: list[str] = []
    versions: dict[str, Version] = {}
    rows: dict[int, dict[str, DocumentRow]] = {}
    for change in changes:
        doc_id = change.document_id
        versions[doc_id] = change.version
        if change.row is None:
            deletes.append(doc_id)
            continue
        truncate[doc_id] = change.row.n_chunks
        for record in change.records:
            for shard, part in route(record, n_shards):
                chunks[shard].append(part)
        rows.setdefault(shard_of(doc_id, n_shards), {})[doc_id] = change.row
    phase1 = {
        i: ShardWrite(upserts=chunks[i], truncate=truncate, delete_documents=deletes, versions=versions)
        for i in range(n_shards)
    }
    phase2 = {
        i: ShardWrite(documents=r, versions={doc_id: versions[doc_id] for doc_id in r})
        for i, r in rows.items()
    }
    return Writes(phase1, phase2)


class Processor(Protocol):
    """Turns one kind of envelope into shard writes. Not thread-safe: one per consumer."""

    kind: str

    def warm_up(self) -> None:
        """Loads what it needs (a tokenizer...). Idempotent."""
        ...

    def prepare(
        self, items: Sequence[Item], stored: Mapping[str, StoredDocument]
    ) -> tuple[list[Unit], list[tuple[Item, Failure]]]:
        """One unit per item it can process, in order, and ``(item, failure)`` for each it cannot:
        dead-lettered with the failure's reason (a :class:`PoisonMessageError`), or as
        ``processing_error`` with the message (a ``str``)."""
        ...

    def writes(self, units: Sequence[Unit], n_shards: int) -> Writes:
        """The writes of ``units`` (vectors set). Raises ``ValueError`` when one of them cannot be
        written; the consumer then narrows it down to the unit that causes it."""
        ...


class Downstream(Protocol):
    """The stages after the consumer: embedders and shards."""

    n_shards: int

    def embed(self, inputs: list[Any]) -> Future[np.ndarray]:
        """Vectors for ``inputs`` (same order): float rows, or for a downstream that does not
        embed (the knowledge graph's extractors) an object array with one result per input; only
        float rows are checked for NaN. The future raises RetryableError when the failure
        is transient (an actor died or timed out), any other error when it will recur."""
        ...

    def stored(self, document_ids: Sequence[str]) -> dict[str, StoredDocument]:
        """What the shards hold of each id (every id asked is in the answer)."""
        ...

    def write(self, writes: Mapping[int, ShardWrite]) -> dict[int, WriteResult]:
        """Applies ``writes[shard]`` on each shard; returns when all are durable."""
        ...


def merge_stored(
    document_ids: Sequence[str],
    rows: Mapping[str, DocumentRow],
    versions: Sequence[Mapping[str, Version]],
) -> dict[str, StoredDocument]:
    """Combines the registry rows with every shard's stored versions: an id is in progress when
    some shard records a version other than the one its registry row was written from."""
    out: dict[str, StoredDocument] = {}
    for doc_id in document_ids:
        row = rows.get(doc_id)
        seen = [v[doc_id] for v in versions if doc_id in v]
        in_progress = row is not None and any(tuple(v) != _source(row) for v in seen)
        out[doc_id] = StoredDocument(row, in_progress)
    return out


def _source(row: DocumentRow) -> Version | None:
    return tuple(row.source) if row.source is not None else None  # type: ignore[return-value]
