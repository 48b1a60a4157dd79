"""GroupMember: one membership of a Kafka consumer group, for the stream consumer.

It owns the kafka-python consumer and everything Kafka-shaped: joining, polling a batch, pausing
every partition while the consumer waits (and still polling, so the group keeps the member),
remembering where to rewind when in-flight work is dropped, seeking back after a rebalance,
committing, and joining again when the client is stuck outside the group.

Rebalance callbacks run inside ``poll``, on the caller's thread. The member tells its owner
(``on_revoked``), which drops its in-flight batches and hands their first offsets back through
:meth:`rewind_to`; the next assignment seeks every partition it keeps back to them.

Not thread-safe: one thread polls; :meth:`assignment` may be read from others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from actors.processor import Record
from schemas.settings import IngestConfig, KafkaConfig
from schemas.topology import Offsets

log = logging.getLogger(__name__)

ConsumerFactory = Callable[[Any], Any]
"""Builds a subscribed consumer (kafka-python's ``KafkaConsumer`` interface) given the rebalance
listener; tests pass a stub."""


class GroupMember:
    """A member of ``group`` reading ``topic``; ``on_revoked(why)`` runs when its partitions go."""

    def __init__(
        self,
        kafka: KafkaConfig,
        ingest: IngestConfig,
        topic: str,
        servers: str,
        group: str,
        name: str,
        on_revoked: Callable[[str], None],
        factory: ConsumerFactory | None = None,
    ) -> None:
        self.kafka, self.ingest, self.topic = kafka, ingest, topic
        self.servers, self.group, self.name = servers, group, name
        self._on_revoked = on_revoked
        self._factory = factory or self._kafka_consumer
        self._consumer: Any = None
        self._rewind: dict[tuple[str, int], int] = {}
        self._paused = False
        self._unassigned_since = time.monotonic()
        self.accumulating: list[Record] = []
        """Records of the batch being polled (a rebalance inside the poll rewinds to them)."""
        self.rejoins = 0
        self.commit_failures = 0

    @property
    def started(self) -> bool:
        return self._consumer is not None

    def start(self) -> None:
        """Subscribes (the first poll joins the group). Idempotent."""
        if self._consumer is None:
            self._consumer = self._new_consumer()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None

    def assignment(self) -> list[str]:
        consumer = self._consumer
        return sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment()) if consumer else []

    # POLLING
    def poll_batch(self, limit: int, max_wait_s: float) -> list[Record]:
        """Up to ``limit`` records: returns once that many arrived, or ``max_wait_s`` after the
        first one (a slow stream still gets timely batches), or after 100 ms of nothing."""
        self.set_paused(False)
        self.accumulating = []
        deadline: float | None = None
        timeout_ms = 100
        while len(self.accumulating) < limit:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=limit - len(self.accumulating))
            self.accumulating.extend(_records(polled))
            if not self.accumulating:
                break
            now = time.monotonic()
            deadline = deadline or now + max_wait_s
            if now >= deadline:
                break
            timeout_ms = max(1, int((deadline - now) * 1000))
        records, self.accumulating = self.accumulating, []
        return records

    def keep_alive(self, timeout_ms: int = 0) -> None:
        """Polls with every partition paused, so the group keeps this member while it waits (for
        vectors, or for a shard to come back). A partition assigned during the poll is not paused
        yet; records it returned are not processed now, so the partition is sought back to them."""
        from kafka import TopicPartition

        self.set_paused(True)
        first: dict[tuple[str, int], int] = {}
        for rec in _records(self._consumer.poll(timeout_ms=timeout_ms)):
            first.setdefault((rec.topic, rec.partition), rec.offset)
        for (topic, partition), offset in first.items():
            self._consumer.seek(TopicPartition(topic, partition), offset)

    def set_paused(self, paused: bool) -> None:
        """Pauses or resumes every assigned partition (all of them each time: a rebalance may
        have assigned new ones since)."""
        assignment = list(self._consumer.assignment())
        if assignment and (paused or self._paused):
            (self._consumer.pause if paused else self._consumer.resume)(*assignment)
        self._paused = paused

    # REWIND: in-flight work dropped is read again from its first record
    def rewind_to(self, first: Offsets) -> None:
        """Remembers ``first`` (per partition, the first offset of dropped work): the partitions
        this member keeps or gets back are sought there (the lowest wins)."""
        for topic, parts in first.items():
            for partition, offset in parts.items():
                key = (topic, partition)
                self._rewind[key] = min(offset, self._rewind.get(key, offset))

    def rewind_now(self) -> None:
        """Seeks the partitions still assigned back to their first dropped record."""
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

    # COMMIT
    def commit(self, offsets: Offsets) -> bool:
        """Commits synchronously; False when the commit failed (a rebalance, a fenced member, the
        coordinator unreachable): the caller then drops its in-flight work, to be read again."""
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
            self.commit_failures += 1
            return False

    # MEMBERSHIP
    def check_membership(self) -> None:
        """Replaces a consumer that holds no partition for ``ingest.rejoin_after_s`` while every
        member should hold one (members <= partitions): a member stuck outside the group would
        leave its share of the topic unread forever, and nothing else would notice."""
        if self._consumer.assignment():
            self._unassigned_since = time.monotonic()
            return
        waited = time.monotonic() - self._unassigned_since
        if waited < self.ingest.rejoin_after_s:
            return
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        if self.ingest.sources > len(partitions):
            self._unassigned_since = time.monotonic()  # more members than partitions: idling is fine
            return
        log.warning(
            "%s: no partition assigned after %.0f s in group %s; joining again with a new consumer",
            self.name,
            waited,
            self.group,
        )
        self.rejoins += 1
        self._on_revoked("rejoining the group")
        self._rewind = {}
        old, self._consumer = self._consumer, None
        try:
            old.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:  # a stuck client may fail to leave cleanly; the new one joins anyway
            log.warning("%s: closing the stuck consumer failed: %r", self.name, exc)
        self._consumer = self._new_consumer()

    def _new_consumer(self) -> Any:
        from kafka import ConsumerRebalanceListener

        member = self

        # Blocking in these (a shard write, a synchronous commit) would stop the group's
        # heartbeats, so the owner writes nothing in flight: it drops it, to be read again.
        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                member._on_revoked("partitions revoked")

            def on_partitions_assigned(self, assigned: Any) -> None:
                member._on_assigned(assigned)

        consumer = self._factory(_Listener())
        self._unassigned_since = time.monotonic()
        self._paused = False
        return consumer

    def _kafka_consumer(self, listener: Any) -> Any:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            bootstrap_servers=self.servers,
            group_id=self.group,
            client_id=self.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self.ingest.max_poll_interval_ms,
            max_partition_fetch_bytes=self.kafka.max_record_bytes + 1024 * 1024,
            fetch_max_bytes=max(52_428_800, self.kafka.max_record_bytes + 1024 * 1024),
        )
        consumer.subscribe([self.topic], listener=listener)
        return consumer


def _records(polled: Any) -> list[Record]:
    return [Record(r.topic, r.partition, r.offset, r.key, r.value) for rs in polled.values() for r in rs]
