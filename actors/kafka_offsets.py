"""Reading a topic's end offsets and a consumer group's committed offsets (lag = end - committed).

Used by the pipeline's driver, `riverbed stats` and the HTTP app's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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
    by_group = _ask_coordinator(servers, group, timeout_s, lambda admin: admin.list_group_offsets(group))
    out: dict[str, dict[int, int]] = {}
    for tp, meta in by_group.get(group, {}).items():
        if meta.offset >= 0:
            out.setdefault(tp.topic, {})[tp.partition] = int(meta.offset)
    return out


def group_members(servers: str, group: str, timeout_s: float = 15.0) -> list[str]:
    """The client ids of the consumers in ``group`` now (none for an empty or unknown group), each
    with the host it connects from (``client-id@/host``). Retries as :func:`committed_offsets`."""
    from kafka.errors import (
        CoordinatorLoadInProgressError,
        CoordinatorNotAvailableError,
        GroupIdNotFoundError,
        NotCoordinatorError,
    )

    def describe(admin: KafkaAdminClient) -> dict[str, Any]:
        found: dict[str, Any] = admin.describe_groups([group]).get(group) or {}
        error = str(found.get("error") or "")  # kafka-python reports a group's error, never raises it
        if not error or GroupIdNotFoundError.__name__ in error:  # a group never joined has no members
            return found
        retried = (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError)
        if any(kind.__name__ in error for kind in retried):
            raise CoordinatorNotAvailableError(error)  # unknown until the coordinator answers: retried
        raise RetryableError(f"members of group {group} on {servers}: {error}")

    members = _ask_coordinator(servers, group, timeout_s, describe).get("members") or []
    return sorted(f"{m.get('client_id', '?')}@{m.get('client_host', '?')}" for m in members)


def _ask_coordinator(
    servers: str, group: str, timeout_s: float, call: Callable[[KafkaAdminClient], Any]
) -> Any:
    """``call(admin)``, retried while ``group``'s coordinator is not available yet."""
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
                return call(admin)
            except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError) as exc:
                if time.monotonic() > deadline:
                    raise RetryableError(f"group {group} on {servers}: {exc}") from exc
                time.sleep(0.5)
    finally:
        admin.close()
