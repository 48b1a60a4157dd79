"""StreamConsumer: one member of a consumer group, from Kafka records to durable writes, for any
kind of record (a :class:`~actors.processor.Processor` knows what a record means).

Delivery: at-least-once from Kafka, made effectively-once by idempotent, versioned writes. A
partition's offset is committed only after every write its records caused is durable on every
shard, every shard has recorded the offsets (so no shard ever holds less than what is committed),
and every dead letter is acknowledged. After a crash, consumption resumes at the committed offsets;
the records read again are upserts by deterministic id, and each shard refuses a change older than
the version it holds (:func:`schemas.topology.is_older`), so neither a redelivery nor a stale
member (one that stalled past ``max.poll.interval`` while another took its partitions over) can
bring an old version back.

Failures (see :mod:`actors.failures`): a record that cannot be decoded or validated is
dead-lettered with its reason; one that is valid but cannot be processed (chunked, embedded,
stored) is isolated by splitting its batch and dead-lettered alone as ``processing_error``, and the
rest of the batch is written and committed. Transient failures (an actor died, a shard's disk is
full, the broker is away) are retried with back-off without limit; while they last the stats name
the stalled phase and count the retries, and the group membership is kept alive.

Ordering: batches are written in the order they were polled, so one id's changes (always on one
partition) apply in order. Within a batch, the last change of an id wins.

Backpressure: at most ``ingest.max_in_flight_batches`` batches are polled and not yet written;
then the assigned partitions are paused, so memory stays bounded whatever the lag. An embedding
that outlasts ``embed_timeout_s`` is never sent again (that would queue the same work behind
itself); it is reported as stalled while the actor runtime retries it if the actor dies.

Rebalance: every batch is committed as soon as it is written, so when partitions are revoked
everything durable is committed; batches in flight are dropped and read again (by this member from
the rewound position, or by the partition's new owner from the committed offset).

Threads: :meth:`run` loops in one thread; :meth:`stop` and :meth:`stats` may be called from others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from actors.dead_letters import DeadLetter, DeadLetterWriter
from actors.failures import UNKNOWN_ATTEMPTS, Backoff, classify
from actors.group_member import ConsumerFactory, GroupMember
from actors.processor import Downstream, Item, Processor, Record, StoredDocument, Unit
from actors.vector_index import ShardWrite, WriteResult
from schemas.envelope import decode_record
from schemas.errors import ConfigError, PoisonMessageError, ProcessingError
from schemas.settings import IngestConfig, KafkaConfig
from schemas.topology import Offsets

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeadLetterSink(Protocol):
    counts: Counter[str]

    def send(self, letter: DeadLetter) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _Dropped(Exception):
    """The batch being finished was dropped by a rebalance while its writes were retried."""


@dataclass
class _Batch:
    seq: int
    records: int
    offsets: Offsets
    """Per partition, the next offset after this batch: what committing it records."""
    first: Offsets
    """Per partition, the first offset of this batch: where to rewind if it is dropped."""
    units: list[Unit]
    inputs: list[Any]
    vectors: Future[np.ndarray] | None
    embed_started: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0
    attempts: int = 0
    dropped: bool = False
    reported_slow: bool = False

    @property
    def ids(self) -> set[str]:
        return {u.item.id for u in self.units}


class StreamConsumer:
    """Consumes ``topic`` in consumer group ``group`` and drives ``processor`` → embed → write."""

    def __init__(
        self,
        kafka: KafkaConfig,
        ingest: IngestConfig,
        topic: str,
        servers: str,
        group: str,
        processor: Processor,
        downstream: Downstream,
        *,
        name: str = "source",
        max_wait_s: float = 0.05,
        embed_timeout_s: float = 300.0,
        consumer_factory: ConsumerFactory | None = None,
        dead_letters: DeadLetterSink | None = None,
        retry_initial_s: float = 0.5,
    ) -> None:
        self.kafka, self.ingest, self.topic = kafka, ingest, topic
        self.retry_initial_s = retry_initial_s
        self.servers, self.group, self.name = servers, group, name
        self.processor, self.downstream = processor, downstream
        self.max_wait_s, self.embed_timeout_s = max_wait_s, embed_timeout_s
        self._member = GroupMember(
            kafka, ingest, topic, servers, group, name, self._drop_in_flight, consumer_factory
        )
        self._dead: DeadLetterSink | None = dead_letters
        self._phase = ("starting", time.monotonic())
        self._stalled: str | None = None
        self._inflight: deque[_Batch] = deque()
        self._seq = 0
        self._stop = threading.Event()
        self.counters: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()

    # LIFECYCLE
    def warm_up(self) -> None:
        """Loads the processor, joins the consumer group, opens the dead-letter producer."""
        self.processor.warm_up()
        self._member.start()
        if self._dead is None:
            self._dead = DeadLetterWriter(
                self.servers, self.kafka.topics.dead_letter, self.kafka.max_record_bytes
            )

    def stop(self) -> None:
        """Asks :meth:`run` to finish the in-flight batches, commit, and return."""
        self._stop.set()

    def close(self) -> None:
        self._member.close()
        if self._dead is not None:
            self._dead.close()
            self._dead = None

    def stats(self) -> dict[str, Any]:
        """Counters, dead letters by reason, retries by phase, the phase (and for how long), what
        it is stalled on (None when not), batches in flight and the assigned partitions."""
        out: dict[str, Any] = dict(self.counters)
        out["rejoins"], out["commit_failures"] = self._member.rejoins, self._member.commit_failures
        if self._dead is not None:
            out["dead_letters"] = dict(self._dead.counts)
        out["retries"] = dict(self.retries)
        out["stalled"] = self._stalled
        out["in_flight_batches"] = len(self._inflight)
        phase, since = self._phase
        out["phase"], out["phase_s"] = phase, round(time.monotonic() - since, 1)
        out["assignment"] = self._member.assignment()
        return out

    def _enter(self, phase: str) -> None:
        if phase != self._phase[0]:
            self._phase = (phase, time.monotonic())

    # LOOP
    def run(self) -> dict[str, Any]:
        """Polls, processes and commits until :meth:`stop`; returns the stats."""
        self.warm_up()
        try:
            while not self._stop.is_set():
                self.step()
            self._drain()
            return self.stats()
        finally:
            self.close()

    def step(self) -> None:
        """One turn: poll a batch if there is room (else keep the membership alive), then write
        every batch at the head of the queue whose vectors are ready."""
        self._member.check_membership()
        if len(self._inflight) < self.ingest.max_in_flight_batches:
            self._enter("polling")
            records = self._member.poll_batch(self.ingest.poll_max_records, self.max_wait_s)
            if records:
                self._inflight.append(self._prepare(records))
        else:
            self._enter("waiting for vectors (backpressure)")
            self._member.keep_alive(timeout_ms=50)
        while self._inflight and self._ready(self._inflight[0]):
            self._finish(self._inflight[0])
        self._watch_embedding()

    def _drain(self) -> None:
        if self._inflight:
            log.info("%s: stopping, finishing %d in-flight batches", self.name, len(self._inflight))
        while self._inflight:
            if self._ready(self._inflight[0]):
                self._finish(self._inflight[0])
            else:
                self._member.keep_alive(timeout_ms=50)
                self._watch_embedding()

    def _drop_in_flight(self, why: str, *also: _Batch) -> None:
        """Forgets every batch not yet committed (and ``also``): the member rewinds the partitions
        it keeps to their first dropped record, where they are read again."""
        batches = (*also, *self._inflight)
        accumulating = self._member.accumulating
        dropped = len(accumulating) + sum(b.records for b in batches)
        for batch in batches:
            batch.dropped = True
            self._member.rewind_to(batch.first)
        first: Offsets = {}
        for rec in accumulating:
            first.setdefault(rec.topic, {}).setdefault(rec.partition, rec.offset)
        self._member.rewind_to(first)
        self._inflight.clear()
        self._member.accumulating = []
        if dropped:
            log.info("%s: %s; %d records in flight will be read again", self.name, why, dropped)
            self.counters["reread_after_rebalance"] += dropped

    # PREPARE: decode, dead-letter, collapse, ask the processor, start embedding
    def _prepare(self, records: list[Record]) -> _Batch:
        self._enter("preparing")
        self._seq += 1
        offsets: Offsets = {}
        first: Offsets = {}
        latest: dict[str, Item] = {}
        for rec in records:
            offsets.setdefault(rec.topic, {})[rec.partition] = rec.offset + 1
            first.setdefault(rec.topic, {}).setdefault(rec.partition, rec.offset)
            item = self._decode(rec)
            if item is not None:
                latest.pop(item.id, None)  # the last change of an id in the batch wins
                latest[item.id] = item
        self.counters["records"] += len(records)
        items = list(latest.values())
        stored = self._stored(items)
        units, failed = self.processor.prepare(items, stored)
        for item, error in failed:
            poison = (
                error
                if isinstance(error, PoisonMessageError)
                else PoisonMessageError("processing_error", error)
            )
            self._dead_letter(item.record, poison)
        inputs = [x for unit in units for x in unit.inputs]
        vectors = self.downstream.embed(inputs) if inputs else None
        return _Batch(self._seq, len(records), offsets, first, units, inputs, vectors)

    def _decode(self, rec: Record) -> Item | None:
        try:
            envelope = decode_record(
                rec.key,
                rec.value,
                default_kind=self.processor.kind,  # type: ignore[arg-type]
                max_bytes=self.kafka.max_record_bytes,
            )
            if envelope.kind != self.processor.kind:
                raise PoisonMessageError(
                    "invalid_envelope",
                    f"a {envelope.kind} envelope on {rec.topic}, which carries "
                    f"{self.processor.kind} envelopes",
                )
        except PoisonMessageError as exc:
            self._dead_letter(rec, exc)
            return None
        return Item(rec, envelope)

    def _stored(self, items: Sequence[Item]) -> dict[str, StoredDocument]:
        """What the shards hold of these ids; an id also in a batch still in flight counts as in
        progress (that batch will write it first), so its content is never skipped as unchanged."""
        ids = [item.id for item in items]
        stored = self._retry(lambda: self.downstream.stored(ids), "reading stored documents", isolating=False)
        pending = set().union(*(b.ids for b in self._inflight)) if self._inflight else set()
        for doc_id in pending.intersection(ids):
            stored[doc_id] = StoredDocument(stored[doc_id].row, in_progress=True)
        return stored

    def _dead_letter(self, rec: Record, exc: PoisonMessageError) -> None:
        log.warning("%s: dead-lettering %s (%s): %s", self.name, rec.where(), exc.reason, exc)
        letter = DeadLetter(exc.reason, str(exc), rec.topic, rec.partition, rec.offset, rec.key, rec.value)
        self._retry(lambda: self._dead_letters.send(letter), "sending a dead letter", isolating=False)

    @property
    def _dead_letters(self) -> DeadLetterSink:
        if self._dead is None:
            raise ConfigError(f"{self.name} is not started: call warm_up() first")
        return self._dead

    # EMBED: wait without blocking the loop; never send the same work twice
    def _ready(self, batch: _Batch) -> bool:
        if batch.vectors is None:
            return True
        return time.monotonic() >= batch.retry_at and batch.vectors.done()

    def _watch_embedding(self) -> None:
        """Reports the head batch as stalled once it has waited ``embed_timeout_s`` for vectors."""
        if not self._inflight or self._inflight[0].vectors is None:
            return
        batch = self._inflight[0]
        waited = time.monotonic() - batch.embed_started
        if waited >= self.embed_timeout_s and not batch.vectors.done():  # type: ignore[union-attr]
            self._stalled = f"embedding: batch {batch.seq} has waited {waited:.0f} s for its vectors"
            if not batch.reported_slow:
                batch.reported_slow = True
                self.counters["embed_slow"] += 1
                log.warning("%s: %s (not sent again: the embedder is still on it)", self.name, self._stalled)

    def _vectors(self, batch: _Batch) -> np.ndarray | None:
        """The batch's vectors, or None when its embedding failed transiently and was sent again
        (after a back-off; the batch waits at the head of the queue). A permanent failure raises."""
        if batch.vectors is None:
            return np.zeros((0, 0), np.float32)
        try:
            vectors = batch.vectors.result()
            self._stalled = None
            return vectors
        except Exception as exc:
            kind = classify(exc)
            batch.attempts += 1
            if kind == "permanent" or (kind == "unknown" and batch.attempts >= UNKNOWN_ATTEMPTS):
                raise
            self.retries["embedding"] += 1
            delay = min(self.retry_initial_s * 2 ** (batch.attempts - 1), 10.0)
            self._stalled = f"embedding: {exc}"
            log.warning(
                "%s: embedding batch %d failed (%s); again in %.1f s", self.name, batch.seq, exc, delay
            )
            batch.retry_at = time.monotonic() + delay
            batch.embed_started = batch.retry_at
            batch.vectors = self.downstream.embed(batch.inputs)
            return None

    # WRITE: vectors into units, phase 1, phase 2 with the offsets, dead letters, commit
    def _finish(self, batch: _Batch) -> None:
        try:
            units = self._embedded_units(batch)
            if units is None:
                return
            self._enter("writing")
            units = self._write(batch, units)
            self._retry(self._dead_letters.flush, "writing dead letters", batch, isolating=False)
        except _Dropped:  # a rebalance while retrying: the batch is read again
            return
        self._inflight.popleft()
        self._enter("committing")
        if not self._member.commit(batch.offsets):
            # No longer (or not surely) a member: what is in flight could overwrite a new owner's
            # newer versions. Drop it all; after the rejoin it is read again.
            self._drop_in_flight("commit failed", batch)
            self._member.rewind_now()
            return
        for unit in units:
            self.counters.update(unit.counts)
        self.counters["batches"] += 1

    def _embedded_units(self, batch: _Batch) -> list[Unit] | None:
        """The batch's units with their vectors (those that cannot be embedded dead-lettered), or
        None when the embedding was sent again after a transient failure."""
        self._enter("embedding")
        try:
            vectors = self._vectors(batch)
            if vectors is None:
                return None
            return self._assign(batch.units, vectors)
        except _Dropped:
            raise
        except Exception as exc:  # the batch's embedding fails and will again: find the culprits
            log.warning(
                "%s: embedding batch %d failed (%r); isolating its records", self.name, batch.seq, exc
            )
            return self._split(batch, batch.units, self._embed_each)

    def _assign(self, units: list[Unit], vectors: np.ndarray) -> list[Unit]:
        """Gives each unit its rows of ``vectors``; a unit whose vectors are not finite is
        dead-lettered (a model that returns NaN for some input will again)."""
        kept, row = [], 0
        for unit in units:
            unit.vectors = vectors[row : row + len(unit.inputs)]
            row += len(unit.inputs)
            if len(unit.inputs) and _numeric(unit.vectors) and not np.isfinite(unit.vectors).all():
                self._processing_error(unit, "the embedding holds NaN or infinity")
            else:
                kept.append(unit)
        if row != len(vectors):
            raise ProcessingError(f"{self.name}: {len(vectors)} vectors for {row} inputs")
        return kept

    def _embed_each(self, batch: _Batch, units: list[Unit]) -> list[Unit]:
        inputs = [x for unit in units for x in unit.inputs]
        if not inputs:
            return units
        vectors = self._retry(lambda: self.downstream.embed(inputs).result(), "embedding", batch)
        kept = self._assign(units, vectors)
        if len(kept) != len(units):
            raise _Isolated(kept)
        return units

    def _write(self, batch: _Batch, units: list[Unit]) -> list[Unit]:
        """Phase 1 then phase 2 of every unit, with the batch's offsets on every shard; returns the
        units written. When the whole batch cannot be written, it is split until the units that
        cannot are found; the offsets are then written on their own."""
        try:
            self._write_units(batch, units, with_offsets=True)
            return units
        except _Dropped:
            raise
        except Exception as exc:  # _retry lets only failures that will recur out
            log.warning("%s: writing batch %d failed (%r); isolating its records", self.name, batch.seq, exc)
        written = self._split(batch, units, self._write_subset, self._erase)
        offsets = {i: ShardWrite(offsets=batch.offsets) for i in range(self.downstream.n_shards)}
        self._retry(lambda: self.downstream.write(offsets), "writing offsets", batch, isolating=False)
        return written

    def _write_subset(self, batch: _Batch, units: list[Unit]) -> list[Unit]:
        self._write_units(batch, units, with_offsets=False)
        return units

    def _write_units(self, batch: _Batch, units: list[Unit], *, with_offsets: bool) -> None:
        writes = self.processor.writes(units, self.downstream.n_shards)
        results = self._retry(lambda: self.downstream.write(writes.phase1), "writing chunks", batch)
        phase2 = dict(writes.phase2)
        if with_offsets:
            for i in range(self.downstream.n_shards):
                base = phase2.get(i, ShardWrite())
                phase2[i] = ShardWrite(
                    documents=base.documents, versions=base.versions, offsets=batch.offsets
                )
        if phase2:
            self._retry(lambda: self.downstream.write(phase2), "writing document rows", batch)
        self._count_stale(results)

    def _count_stale(self, results: dict[int, WriteResult]) -> None:
        # Phase 1 sends each document's version to every shard, so each shard refuses the same
        # stale documents: the most any shard refused is how many there were.
        stale = max((r.stale for r in results.values()), default=0)
        if stale:
            self.counters["stale"] += stale
            log.info("%s: %d changes were older than what the shards hold; skipped", self.name, stale)

    def _isolate(
        self,
        batch: _Batch,
        units: list[Unit],
        attempt: Callable[[_Batch, list[Unit]], list[Unit]],
        on_failure: Callable[[_Batch, Unit], None] | None = None,
    ) -> list[Unit]:
        """Runs ``attempt`` on ``units``; on a failure that will recur, on each half, down to the
        single units that fail, which are dead-lettered (and passed to ``on_failure``). Returns
        the units that succeeded. ``attempt`` is idempotent (embedding, or versioned upserts), so
        doing a half again after part of it was written changes nothing."""
        if not units:
            return []
        try:
            return attempt(batch, units)
        except _Dropped:
            raise
        except _Isolated as partial:
            return partial.kept
        except Exception as exc:
            if len(units) == 1:
                cause = getattr(exc, "cause", None)
                kind = type(cause if isinstance(cause, BaseException) else exc).__name__
                self._processing_error(units[0], f"{kind}: {_brief(exc)}")
                if on_failure is not None:
                    on_failure(batch, units[0])
                return []
        return self._split(batch, units, attempt, on_failure)

    def _split(
        self,
        batch: _Batch,
        units: list[Unit],
        attempt: Callable[[_Batch, list[Unit]], list[Unit]],
        on_failure: Callable[[_Batch, Unit], None] | None = None,
    ) -> list[Unit]:
        """:meth:`_isolate` on each half of ``units`` (a single unit: on itself)."""
        if len(units) <= 1:
            return self._isolate(batch, units, attempt, on_failure) if units else []
        self.counters["isolation_splits"] += 1
        half = len(units) // 2
        return self._isolate(batch, units[:half], attempt, on_failure) + self._isolate(
            batch, units[half:], attempt, on_failure
        )

    def _erase(self, batch: _Batch, unit: Unit) -> None:
        """Deletes, at the failed record's version, whatever its phase 1 wrote on the shards that
        took it before another refused it: the index never holds half of a document. The record
        itself is in the dead letters, and an older version can never come back."""
        doc_id, version = unit.item.id, unit.item.record.version
        erase = {
            i: ShardWrite(delete_documents=[doc_id], versions={doc_id: version})
            for i in range(self.downstream.n_shards)
        }
        try:
            self._retry(lambda: self.downstream.write(erase), "erasing a record", batch, isolating=False)
        except _Dropped:
            raise
        except Exception as exc:  # nothing more can be done for it: say so loudly, go on
            log.error("%s: could not erase %s after it failed: %s", self.name, unit.item.record.where(), exc)

    def _processing_error(self, unit: Unit, error: str) -> None:
        self.counters["processing_errors"] += 1
        self._dead_letter(unit.item.record, PoisonMessageError("processing_error", error))

    # RETRY: transient failures forever (visibly, keeping the membership), unknown ones 3 times
    def _retry(
        self, call: Callable[[], T], what: str, batch: _Batch | None = None, *, isolating: bool = True
    ) -> T:
        """``call()``, retried while it fails transiently; an unknown failure is retried
        :data:`UNKNOWN_ATTEMPTS` times when ``isolating`` (the caller then narrows it down to a
        record), else like a transient one: with no record to blame, giving up would only stop the
        partition."""
        backoff, unknown = Backoff(self.retry_initial_s), 0
        while True:
            try:
                result = call()
                if self._stalled and self._stalled.startswith(what):
                    self._stalled = None
                return result
            except Exception as exc:
                kind = classify(exc)
                if kind == "permanent":
                    raise
                if kind == "unknown" and isolating:
                    unknown += 1
                    if unknown >= UNKNOWN_ATTEMPTS:
                        raise
                self.retries[what] += 1
                self._stalled = f"{what}: {_brief(exc)}"
                delay = backoff.next()
                log.warning("%s: %s failed (%s); retrying in %.1f s", self.name, what, _brief(exc), delay)
                self._wait(delay, batch)

    def _wait(self, delay_s: float, batch: _Batch | None) -> None:
        """Sleeps ``delay_s`` while keeping the membership alive; raises :class:`_Dropped` when a
        rebalance meanwhile dropped ``batch``."""
        deadline = time.monotonic() + delay_s
        while True:
            if self._member.started and batch is not None:
                self._member.keep_alive(timeout_ms=0)
                if batch.dropped:
                    raise _Dropped
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.5))


def _numeric(outputs: np.ndarray) -> bool:
    """Whether a downstream's outputs are numbers (vectors), not objects (a graph's facts)."""
    return outputs.dtype.kind in "fc"


class _Isolated(Exception):
    """Some units of an attempt were dead-lettered on the way; ``kept`` are the others."""

    def __init__(self, kept: list[Unit]) -> None:
        super().__init__(f"{len(kept)} units kept")
        self.kept = kept


def _brief(exc: BaseException) -> str:
    """The error's own message: an actor's error arrives wrapped with its remote traceback
    (``cause`` is the original), which is too long for a stats line."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)
