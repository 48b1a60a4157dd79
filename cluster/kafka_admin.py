"""Kafka plumbing shared by the CLI, the pipeline and the tests: which broker, and its topics."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from cluster.local_kafka import LocalKafka
from schemas.errors import RetryableError
from schemas.settings import Settings, TopicsConfig

log = logging.getLogger(__name__)


def local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(settings.kafka.embedded, settings.cache_dir, settings.home)


def bootstrap_servers(settings: Settings, *, start: bool = True) -> str:
    """The configured broker, or the embedded one (started when ``start``, else it must run)."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    kafka = local_kafka(settings)
    state = kafka.start() if start else kafka.state()
    if state is None:
        raise RetryableError("the embedded Kafka broker is not running: start it with `riverbed kafka start`")
    return state.bootstrap_servers


def topic_specs(topics: TopicsConfig) -> dict[str, int]:
    """Topic name -> partition count, as configured."""
    return {
        topics.documents: topics.documents_partitions,
        topics.images: topics.images_partitions,
        topics.dead_letter: topics.dead_letter_partitions,
    }


def ensure_topics(servers: str, specs: dict[str, int], *, max_message_bytes: int | None = None) -> list[str]:
    """Creates the missing topics (one replica each on a single-node broker, else the broker's
    default replication). Existing topics are left as they are. Returns the names created."""
    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="riverbed-admin")
    try:
        existing = set(admin.list_topics())
        brokers = len(admin.describe_cluster().get("brokers", [])) or 1
        # Headroom over the record limit: a dead letter is the original record plus headers.
        configs = {"max.message.bytes": str(max_message_bytes + 1024 * 1024)} if max_message_bytes else None
        missing = [
            NewTopic(
                name,
                num_partitions=n,
                replication_factor=min(3, brokers) if brokers > 1 else 1,
                topic_configs=configs,
            )
            for name, n in specs.items()
            if name not in existing
        ]
        if not missing:
            return []
        try:
            admin.create_topics(missing, wait_for_metadata=True)
        except TopicAlreadyExistsError:
            pass  # another client created it between list and create
        except KafkaError as exc:
            raise RetryableError(
                f"creating topics {[t.name for t in missing]} on {servers} failed: {exc}"
            ) from exc
        created = [t.name for t in missing]
        log.info("created topics %s", created)
        return created
    finally:
        admin.close()


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
