"""KafkaSource: one member of the ingest consumer group, from records to durable shard writes.

Delivery contract (DESIGN.md, "Durability and delivery"): at-least-once from Kafka, made
effectively-once by idempotent writes. A partition's offset is committed only after every write
that its records caused is durable on every shard (and every dead letter is acknowledged). Each
batch is committed synchronously as soon as it is written, so when partitions are revoked
everything durable is already committed; batches still in flight (not yet written) are dropped and
read again from the committed offsets. After a crash, the records past the committed offsets are
delivered again; their writes are upserts by chunk id, and a document whose content hash is
already stored is not re-embedded. A dead letter may be written twice after a crash or rebalance;
its headers (source topic, partition, offset) identify it, and ``stats`` counts each once.

Ordering: batches are written in the order they were polled, so one id's changes (always on one
partition) apply in order. Within a batch, the last change of an id wins.

Backpressure: at most ``ingest.max_in_flight_batches`` batches are polled and not yet written;
when that many are pending, the assigned partitions are paused, so memory stays bounded whatever
the lag.

Threads: :meth:`run` loops in one thread; :meth:`stop` and :meth:`stats` may be called from others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from actors.chunker import ChunkedDocument, Chunker
from actors.dead_letters import DeadLetter, DeadLetterWriter
from actors.vector_index import ChunkRecord, DocumentRow, ShardWrite
from schemas.envelope import DocumentEnvelope, ImageEnvelope, decode_record
from schemas.errors import PoisonMessageError, RetryableError
from schemas.ids import shard_of
from schemas.settings import ChunkConfig, IngestConfig, KafkaConfig

log = logging.getLogger(__name__)

Offsets = dict[str, dict[int, int]]
T = TypeVar("T")


class Downstream(Protocol):
    """The stages after the source: embedders and shards (Ray actors, or in-process for tests)."""

    n_shards: int

    def embed(self, texts: list[str]) -> Future[np.ndarray]:
        """Vectors for ``texts`` (same order); the future raises RetryableError when transient."""
        ...

    def document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        """Stored rows of those documents that have one (read from each id's registry shard)."""
        ...

    def write(self, writes: Mapping[int, ShardWrite]) -> None:
        """Applies ``writes[shard]`` on each shard; returns when all are durable."""
        ...


@dataclass
class _Batch:
    seq: int
    offsets: Offsets
    upserts: list[tuple[DocumentEnvelope, ChunkedDocument]]
    deletes: list[str]
    vectors: Future[np.ndarray] | None
    records: int
    texts: list[str] = field(default_factory=list)
    first: Offsets = field(default_factory=dict)
    """The first offset of each partition in this batch: where to rewind if it is dropped."""
    sources: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """Each upserted document's record: ``(topic, partition, offset)``."""


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class KafkaSource:
    """Consumes the documents topic in the ingest consumer group and drives chunk → embed → write."""

    def __init__(
        self,
        kafka: KafkaConfig,
        ingest: IngestConfig,
        chunk: ChunkConfig,
        model: str,
        servers: str,
        group: str,
        downstream: Downstream,
        name: str = "source",
        max_wait_s: float = 0.05,
        embed_timeout_s: float = 300.0,
    ) -> None:
        self.kafka = kafka
        self.ingest = ingest
        self.servers = servers
        self.group = group
        self.name = name
        self.downstream = downstream
        self.max_wait_s = max_wait_s
        self.embed_timeout_s = embed_timeout_s
        self._phase = ("starting", time.monotonic())
        self._accumulating: list[_Record] = []
        self._rewind: dict[tuple[str, int], int] = {}
        self.chunker = Chunker(chunk, model)
        self._consumer: Any = None
        self._dead: DeadLetterWriter | None = None
        self._inflight: deque[_Batch] = deque()
        self._pending_hash: dict[str, tuple[str | None, int]] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._paused = False
        self._unassigned_since = time.monotonic()
        self.counters: Counter[str] = Counter()

    # LIFECYCLE
    def warm_up(self) -> None:
        """Loads the tokenizer, joins the consumer group, opens the dead-letter producer."""
        self.chunker.warm_up()
        if self._consumer is not None:
            return
        self._consumer = self._new_consumer()
        self._dead = DeadLetterWriter(
            self.servers, self.kafka.topics.dead_letter, self.kafka.max_record_bytes
        )

    def _new_consumer(self) -> Any:
        """A consumer subscribed to the documents topic in the group (not yet joined: the first
        poll joins), with the rebalance listener that drops and rewinds in-flight batches."""
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        source = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                source._on_revoked(revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                source._on_assigned(assigned)

        consumer = KafkaConsumer(
            bootstrap_servers=self.servers,
            group_id=self.group,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.kafka.max_record_bytes + 1024 * 1024,
            fetch_max_bytes=max(52_428_800, self.kafka.max_record_bytes + 1024 * 1024),
        )
        consumer.subscribe([self.kafka.topics.documents], listener=_Listener())
        self._unassigned_since = time.monotonic()
        self._paused = False
        return consumer

    def stop(self) -> None:
        """Asks :meth:`run` to finish the in-flight batches, commit, and return."""
        self._stop.set()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._dead is not None:
            self._dead.close()
            self._dead = None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        if self._dead is not None:
            out["dead_letters"] = dict(self._dead.counts)
        out["in_flight_batches"] = len(self._inflight)
        phase, since = self._phase
        out["phase"] = phase
        out["phase_s"] = round(time.monotonic() - since, 1)
        consumer = self._consumer
        out["assignment"] = (
            sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment()) if consumer else []
        )
        return out

    def _enter(self, phase: str) -> None:
        """Records what the loop is doing (``stats`` shows it, so a stall names its stage)."""
        if phase != self._phase[0]:
            self._phase = (phase, time.monotonic())

    # LOOP
    def run(self) -> dict[str, Any]:
        """Polls, processes and commits until :meth:`stop`; returns the counters."""
        self.warm_up()
        try:
            while not self._stop.is_set():
                self.step()
            self._drain("stopping")
        finally:
            self.close()
        return self.stats()

    def step(self) -> None:
        """One turn: poll a batch if there is room, then write every batch whose vectors are ready."""
        self._check_membership()
        if len(self._inflight) < self.ingest.max_in_flight_batches:
            self._set_paused(False)
            self._enter("polling")
            records = self._poll_batch()
            if records:
                self._inflight.append(self._prepare(records))
        else:
            self._set_paused(True)
            self._enter("paused (backpressure)")
            self._consumer.poll(timeout_ms=0)  # keeps group membership; paused: fetches nothing
            if self._inflight:  # a rebalance inside that poll drops what was in flight
                self._finish(self._inflight[0])
        while self._inflight and (self._inflight[0].vectors is None or self._inflight[0].vectors.done()):
            self._finish(self._inflight[0])

    def _check_membership(self) -> None:
        """Replaces a consumer that holds no partition for ``ingest.rejoin_after_s`` while every
        source should hold one (sources <= partitions): a member stuck outside the group would
        otherwise leave its share of the topic unread forever, and nothing else would notice."""
        if self._consumer.assignment():
            self._unassigned_since = time.monotonic()
            return
        waited = time.monotonic() - self._unassigned_since
        if waited < self.ingest.rejoin_after_s:
            return
        partitions = self._consumer.partitions_for_topic(self.kafka.topics.documents) or set()
        if self.ingest.sources > len(partitions):
            self._unassigned_since = time.monotonic()  # more sources than partitions: idling is fine
            return
        log.warning(
            "%s: no partition assigned after %.0f s in group %s; joining again with a new consumer",
            self.name,
            waited,
            self.group,
        )
        self.counters["rejoins"] += 1
        self._drop_in_flight("rejoining the group")
        self._rewind = {}
        old, self._consumer = self._consumer, None
        try:
            old.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:  # a stuck client may fail to leave cleanly; the new one joins anyway
            log.warning("%s: closing the stuck consumer failed: %r", self.name, exc)
        self._consumer = self._new_consumer()

    def _poll_batch(self) -> list[_Record]:
        """Up to ``poll_max_records`` records: returns once that many arrived, or ``max_wait_s``
        after the first one (a slow stream still gets timely batches), or after 100 ms of nothing."""
        limit = self.ingest.poll_max_records
        self._accumulating = []
        deadline: float | None = None
        timeout_ms = 100
        while len(self._accumulating) < limit:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=limit - len(self._accumulating))
            self._accumulating.extend(
                _Record(r.topic, r.partition, r.offset, r.key, r.value) for rs in polled.values() for r in rs
            )
            if not self._accumulating:
                break
            now = time.monotonic()
            deadline = deadline or now + self.max_wait_s
            if now >= deadline:
                break
            timeout_ms = max(1, int((deadline - now) * 1000))
        records, self._accumulating = self._accumulating, []
        return records

    # REBALANCE: kafka-python calls these on its IO thread while the loop thread waits in poll(),
    # so no batch is being written now. Blocking here (a shard write, a synchronous commit) would
    # stop the group's heartbeats, so nothing in flight is written: every write already finished
    # is committed, and what is in flight is dropped and read again (by this member from the
    # rewound position, or by the partition's new owner from the committed offset).
    def _on_revoked(self, revoked: Any) -> None:
        self._drop_in_flight("partitions revoked")

    def _drop_in_flight(self, why: str, *also: _Batch) -> None:
        """Forgets every batch not yet committed (and ``also``); the next assignment rewinds the
        partitions this member keeps to their first dropped record."""
        dropped = len(self._accumulating) + sum(b.records for b in (*also, *self._inflight))
        for batch in (*also, *self._inflight):
            for topic, parts in batch.first.items():
                for partition, offset in parts.items():
                    key = (topic, partition)
                    self._rewind[key] = min(offset, self._rewind.get(key, offset))
        for rec in self._accumulating:
            key = (rec.topic, rec.partition)
            self._rewind[key] = min(rec.offset, self._rewind.get(key, rec.offset))
        self._inflight.clear()
        self._accumulating = []
        self._pending_hash.clear()
        if dropped:
            log.info("%s: %s; %d records in flight will be read again", self.name, why, dropped)
            self.counters["reread_after_rebalance"] += dropped

    def _rewind_now(self) -> None:
        """Seeks the partitions still assigned back to their first dropped record (a dropped
        batch whose partition stays here must not be skipped)."""
        from kafka import TopicPartition

        for tp in self._consumer.assignment():
            offset = self._rewind.pop((tp.topic, tp.partition), None)
            if offset is not None:
                self._consumer.seek(TopicPartition(tp.topic, tp.partition), offset)

    def _on_assigned(self, assigned: Any) -> None:
        from kafka import TopicPartition

        for tp in assigned:
            offset = self._rewind.get((tp.topic, tp.partition))
            if offset is not None:  # kept across the rebalance: go back to what was dropped
                self._consumer.seek(TopicPartition(tp.topic, tp.partition), offset)
        self._rewind = {}
        log.info("%s assigned %s", self.name, sorted((tp.topic, tp.partition) for tp in assigned))

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            assignment = list(self._consumer.assignment())
            (self._consumer.pause if paused else self._consumer.resume)(*assignment)
            self._paused = paused

    def _drain(self, why: str) -> None:
        if self._inflight:
            log.info("%s: %s, finishing %d in-flight batches", self.name, why, len(self._inflight))
        while self._inflight:
            self._finish(self._inflight[0])

    # PREPARE: decode, dead-letter, collapse, skip unchanged, chunk, start embedding
    @property
    def _dead_letters(self) -> DeadLetterWriter:
        if self._dead is None:
            raise RetryableError(f"{self.name} is not started: call warm_up() first")
        return self._dead

    def _prepare(self, records: list[_Record]) -> _Batch:
        self._enter("preparing")
        self._seq += 1
        offsets: Offsets = {}
        first: Offsets = {}
        latest: dict[str, tuple[_Record, DocumentEnvelope | ImageEnvelope]] = {}
        for rec in records:
            offsets.setdefault(rec.topic, {})[rec.partition] = rec.offset + 1
            first.setdefault(rec.topic, {}).setdefault(rec.partition, rec.offset)
            try:
                envelope = decode_record(rec.key, rec.value, max_bytes=self.kafka.max_record_bytes)
                if isinstance(envelope, ImageEnvelope):
                    raise PoisonMessageError("invalid_envelope", "image envelopes belong on the images topic")
            except PoisonMessageError as exc:
                self._dead_letter(rec, exc)
                continue
            latest[envelope.id] = (rec, envelope)  # the last change of an id in the batch wins
        self.counters["records"] += len(records)

        deletes = [doc_id for doc_id, (_, env) in latest.items() if env.is_delete]
        upserts = [
            (rec, env)
            for rec, env in latest.values()
            if isinstance(env, DocumentEnvelope) and not env.is_delete
        ]
        chunked = self._chunk(upserts)
        stored = self._retry(
            lambda: self.downstream.document_rows([env.id for env, _ in chunked]), "reading documents"
        )
        changed = []
        for env, doc in chunked:
            pending = self._pending_hash.get(env.id)
            current = (
                pending[0]
                if pending is not None
                else (stored[env.id].content_hash if env.id in stored else None)
            )
            if current == doc.content_hash:
                self.counters["unchanged"] += 1
            else:
                changed.append((env, doc))
        for env, doc in changed:
            self._pending_hash[env.id] = (doc.content_hash, self._seq)
        for doc_id in deletes:
            self._pending_hash[doc_id] = (None, self._seq)
        # Dead letters are durable before anything of this batch is committed.
        self._retry(self._dead_letters.flush, "writing dead letters")

        texts = [chunk.text for _, doc in changed for chunk in doc.chunks]
        sources = {env.id: (rec.topic, rec.partition, rec.offset) for rec, env in latest.values()}
        batch = _Batch(self._seq, offsets, changed, deletes, None, len(records), texts, first, sources)
        if texts:
            batch.vectors = self.downstream.embed(texts)
        return batch

    def _chunk(
        self, upserts: list[tuple[_Record, DocumentEnvelope]]
    ) -> list[tuple[DocumentEnvelope, ChunkedDocument]]:
        envelopes = [env for _, env in upserts]
        try:
            return list(zip(envelopes, self.chunker.chunk_batch(envelopes), strict=True))
        except ValueError:
            pass  # one bad document fails the batch call: find it, dead-letter it, keep the rest
        out = []
        for rec, env in upserts:
            try:
                out.append((env, self.chunker.chunk(env)))
            except ValueError as exc:
                self._dead_letter(rec, PoisonMessageError("processing_error", f"chunking failed: {exc}"))
        return out

    def _dead_letter(self, rec: _Record, exc: PoisonMessageError) -> None:
        log.warning(
            "%s: dead-lettering %s[%d]@%d (%s): %s",
            self.name,
            rec.topic,
            rec.partition,
            rec.offset,
            exc.reason,
            exc,
        )
        self._dead_letters.send(
            DeadLetter(exc.reason, str(exc), rec.topic, rec.partition, rec.offset, rec.key, rec.value)
        )

    # WRITE: vectors to shards (phase 1), then document rows (phase 2), then commit
    def _finish(self, batch: _Batch) -> None:
        vectors = self._await_vectors(batch)
        n = self.downstream.n_shards
        records: dict[int, list[ChunkRecord]] = {i: [] for i in range(n)}
        row = 0
        for env, doc in batch.upserts:
            for chunk in doc.chunks:
                records[shard_of(chunk.chunk_id, n)].append(
                    ChunkRecord(
                        chunk.chunk_id,
                        doc.document_id,
                        chunk.number,
                        chunk.text,
                        env.title,
                        chunk.start,
                        chunk.end,
                        env.metadata,
                        vectors[row],
                    )
                )
                row += 1
        truncate = {doc.document_id: len(doc.chunks) for _, doc in batch.upserts}
        if batch.upserts or batch.deletes:
            phase1 = {
                i: ShardWrite(
                    upserts=records[i],
                    truncate=truncate,
                    delete_documents=batch.deletes,
                    offsets=batch.offsets,
                )
                for i in range(n)
            }
            self._enter("writing")
            self._retry(lambda: self.downstream.write(phase1), "writing chunks")
            rows: dict[int, dict[str, DocumentRow]] = {}
            for _, doc in batch.upserts:
                rows.setdefault(shard_of(doc.document_id, n), {})[doc.document_id] = DocumentRow(
                    doc.content_hash, len(doc.chunks), batch.sources.get(doc.document_id)
                )
            phase2 = {i: ShardWrite(documents=r) for i, r in rows.items()}
            if phase2:
                self._retry(lambda: self.downstream.write(phase2), "writing document rows")
        self._inflight.popleft()
        self._enter("committing")
        if not self._commit(batch.offsets):
            # No longer (or not surely) a member: writing what is in flight could overwrite a new
            # owner's newer versions. Drop it all; after the rejoin it is read again.
            self._drop_in_flight("commit failed", batch)
            self._rewind_now()
            return
        for doc_id, (_, seq) in list(self._pending_hash.items()):
            if seq == batch.seq:
                del self._pending_hash[doc_id]
        self.counters["documents"] += len(batch.upserts)
        self.counters["deletes"] += len(batch.deletes)
        self.counters["chunks"] += row
        self.counters["batches"] += 1

    def _await_vectors(self, batch: _Batch) -> np.ndarray:
        if batch.vectors is None:
            return np.zeros((0, 0), dtype=np.float32)
        self._enter("embedding")
        delay = 0.5
        while True:
            try:
                return batch.vectors.result(timeout=self.embed_timeout_s)
            except TimeoutError:
                # Embedding is a pure function: asking again is safe, and a lost reply (an actor
                # restarted under the call) can never stall the partition.
                log.warning(
                    "%s: no vectors for batch %d after %.0f s; asking again",
                    self.name,
                    batch.seq,
                    self.embed_timeout_s,
                )
                self.counters["embed_timeouts"] += 1
                batch.vectors = self.downstream.embed(batch.texts)
            except RetryableError as exc:
                log.warning(
                    "%s: embedding batch %d failed (%s); retrying in %.1f s", self.name, batch.seq, exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                batch.vectors = self.downstream.embed(batch.texts)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """``call()``, retried with capped exponential back-off while it raises RetryableError."""
        delay = 0.5
        while True:
            try:
                return call()
            except RetryableError as exc:
                log.warning("%s: %s failed (%s); retrying in %.1f s", self.name, what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _commit(self, offsets: Offsets) -> bool:
        """Commits synchronously; False when the commit failed (a rebalance, a fenced member, the
        coordinator unreachable): the records are then read again, idempotently."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        positions = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for topic, parts in offsets.items()
            for partition, offset in parts.items()
        }
        try:
            self._consumer.commit(offsets=positions)
            return True
        except KafkaError as exc:
            log.warning("%s: commit of %s failed: %r", self.name, offsets, exc)
            self.counters["commit_failures"] += 1
            return False
