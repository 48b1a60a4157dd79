"""Reading a topic's end offsets and a consumer group's committed offsets (lag = end - committed).

Used by the pipeline's driver, `riverbed stats` and the HTTP app's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaAdminClient

from schemas.errors import RetryableError


def end_offsets(servers: str, topics: Iterable[str]) -> dict[str, dict[int, int]]:
    """The next offset to be written, per partition of each topic (a high-water mark)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        ends = consumer.end_offsets(partitions) if partitions else {}
        out: dict[str, dict[int, int]] = {}
        for tp, offset in ends.items():
            out.setdefault(tp.topic, {})[tp.partition] = int(offset)
        return out
    finally:
        consumer.close()


def committed_offsets(servers: str, group: str, timeout_s: float = 15.0) -> dict[str, dict[int, int]]:
    """The consumer group's committed offsets: {topic: {partition: next offset to read}}.

    Retries while the group coordinator is not yet available (a fresh broker creates its offsets
    topic on the first group request); raises RetryableError after ``timeout_s``."""
    import time

    from kafka.errors import (
        CoordinatorLoadInProgressError,
        CoordinatorNotAvailableError,
        NotCoordinatorError,
    )

    deadline = time.monotonic() + timeout_s
    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="riverbed-admin")
    try:
        while True:
            try:
                by_group = admin.list_group_offsets(group)
                break
            except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError) as exc:
                if time.monotonic() > deadline:
                    raise RetryableError(f"offsets of group {group} on {servers}: {exc}") from exc
                time.sleep(0.5)
    finally:
        admin.close()
    out: dict[str, dict[int, int]] = {}
    for tp, meta in by_group.get(group, {}).items():
        if meta.offset >= 0:
            out.setdefault(tp.topic, {})[tp.partition] = int(meta.offset)
    return out
