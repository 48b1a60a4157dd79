"""The dead-letter topic: a record that can never be processed is kept there with its original
key and value bytes, and headers naming why (a reason of ``schemas.errors.DeadLetterReason``) and
where it came from (see ``docs/contracts.md``).

Delivery: :meth:`DeadLetterWriter.flush` returns only when every dead letter sent so far is
acknowledged by the broker, so the caller may then commit the source offsets past them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from schemas.errors import DeadLetterReason, RetryableError


@dataclass(frozen=True)
class DeadLetter:
    reason: DeadLetterReason
    error: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("reason", self.reason.encode()),
            ("error", self.error[:4000].encode("utf-8", "replace")),
            ("source_topic", self.topic.encode()),
            ("source_partition", str(self.partition).encode()),
            ("source_offset", str(self.offset).encode()),
        ]


class DeadLetterWriter:
    """Sends dead letters to one topic. Not thread safe."""

    def __init__(self, servers: str, topic: str, max_record_bytes: int) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        # The dead-letter topic is created with 1 MiB over the record limit (cluster/kafka_admin.py),
        # so every record that the documents topic accepted fits, headers included.
        self.max_value_bytes = max_record_bytes + 1024 * 1024 - 64 * 1024
        self.counts: Counter[str] = Counter()
        self._producer = KafkaProducer(
            bootstrap_servers=servers,
            client_id="riverbed-dead-letters",
            acks="all",
            enable_idempotence=True,
            max_request_size=max_record_bytes + 1024 * 1024,
        )
        self._pending: list[tuple[DeadLetter, Any]] = []

    def send(self, letter: DeadLetter) -> None:
        """Queues ``letter`` with its original key and value. Only a value larger than the topic
        can hold (from a documents topic created elsewhere with a higher limit) is dropped, with a
        ``value_dropped`` header giving its size: a letter must never block its partition."""
        value, headers = letter.value, letter.headers()
        if value is not None and len(value) > self.max_value_bytes:
            headers.append(("value_dropped", f"{len(value)} bytes".encode()))
            value = None
        future = self._producer.send(self.topic, key=letter.key, value=value, headers=headers)
        self._pending.append((letter, future))

    def flush(self, timeout_s: float = 60.0) -> None:
        """Blocks until every pending dead letter is acknowledged; raises RetryableError if not."""
        if not self._pending:
            return
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=timeout_s)
            for _, future in self._pending:
                future.get(timeout=timeout_s)
        except KafkaError as exc:
            # Queue every letter again, so the caller's retry sends them instead of finding nothing
            # pending. One already delivered is then written twice; stats counts it once.
            letters = [letter for letter, _ in self._pending]
            self._pending.clear()
            for letter in letters:
                self.send(letter)
            raise RetryableError(f"writing a dead letter to {self.topic} failed: {exc}") from exc
        for letter, _ in self._pending:
            self.counts[letter.reason] += 1
        self._pending.clear()

    def close(self) -> None:
        self._producer.close()


def read_dead_letter_counts(servers: str, topic: str, timeout_s: float = 10.0) -> dict[str, int]:
    """Counts the dead letters on ``topic`` by their ``reason`` header (reads the whole topic).

    A record dead-lettered twice (re-delivered after a crash or rebalance) counts once: its
    source topic, partition and offset identify it."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, client_id="riverbed-stats")
    counts: Counter[str] = Counter()
    seen: set[tuple[bytes, bytes, bytes]] = set()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return {}
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        import time

        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    headers = dict(record.headers or [])
                    origin = (
                        headers.get("source_topic", b""),
                        headers.get("source_partition", b""),
                        headers.get("source_offset", str(record.offset).encode()),
                    )
                    if origin in seen:
                        continue
                    seen.add(origin)
                    counts[headers.get("reason", b"unknown").decode("utf-8", "replace")] += 1
    finally:
        consumer.close()
    return dict(counts)
