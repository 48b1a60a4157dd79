"""Kafka plumbing shared by the CLI, the pipeline and the tests: which broker, and its topics."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from actors.kafka_offsets import committed_offsets, end_offsets, group_members
from cluster.local_kafka import LocalKafka
from schemas.errors import ConfigError, RetryableError
from schemas.settings import Settings, TopicsConfig

log = logging.getLogger(__name__)

__all__ = [
    "bootstrap_servers",
    "committed_offsets",
    "end_offsets",
    "ensure_topics",
    "local_kafka",
    "refuse_if_consumed",
    "topic_specs",
]


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


def refuse_if_consumed(settings: Settings) -> None:
    """ConfigError when a consumer group of this index (its documents, images or graph group) has
    members now: another ingest of the index is running, in this cluster or another. A second one
    would split the partitions with it and write the same shard stores from two places."""
    servers = bootstrap_servers(settings)
    for side in (settings, settings.image_side(), settings.graph_side()):
        members = group_members(servers, side.consumer_group)
        if members:
            raise ConfigError(
                f"index {settings.index.name!r} is being ingested elsewhere: consumer group "
                f"{side.consumer_group!r} has {len(members)} members ({', '.join(members[:4])}); "
                "stop that ingest, or ingest into a new index"
            )


def topic_specs(topics: TopicsConfig) -> dict[str, int]:
    """Topic name -> partition count, as configured."""
    return {
        topics.documents: topics.documents_partitions,
        topics.images: topics.images_partitions,
        topics.dead_letter: topics.dead_letter_partitions,
    }


TOPIC_HEADROOM = 1024 * 1024
"""A topic's ``max.message.bytes`` over ``kafka.max_record_bytes``: a dead letter is the original
record plus its headers."""


def ensure_topics(servers: str, specs: dict[str, int], *, max_message_bytes: int | None = None) -> list[str]:
    """Creates the missing topics (one replica each on a single-node broker, else the broker's
    default replication). Existing topics are left as they are. Returns the names created."""
    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="riverbed-admin")
    try:
        existing = set(admin.list_topics())
        brokers = len(admin.describe_cluster().get("brokers", [])) or 1
        configs = (
            {"max.message.bytes": str(max_message_bytes + TOPIC_HEADROOM)} if max_message_bytes else None
        )
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
