"""Integration tier: the real Kafka broker (started once per session), real Ray, real models.

Each test gets fresh topics (``topic_name``), so tests never see each other's records.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.kafka_admin import ensure_topics
from cluster.local_kafka import BrokerState, LocalKafka
from schemas.settings import EmbeddedKafkaConfig, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    # The jar cache is shared with `make demo` (the real default), so tests fetch nothing twice.
    return load_settings().cache_dir


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[BrokerState]:
    """One real single-node KRaft broker for the whole session, stopped at the end whatever happens."""
    home = tmp_path_factory.mktemp("kafka-home")
    kafka = LocalKafka(EmbeddedKafkaConfig(), cache_dir, home)
    state = kafka.start()
    try:
        yield state
    finally:
        kafka.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    return f"t.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}".replace("[", "_").replace("]", "_")


@pytest.fixture
def settings(tmp_path: Path, broker: BrokerState, topic_name: str) -> Settings:
    """Settings for one test: its own home, the session broker, its own topics."""
    topics = {
        "documents": f"{topic_name}.docs",
        "images": f"{topic_name}.images",
        "dead_letter": f"{topic_name}.dlq",
        "documents_partitions": 2,
    }
    s = load_settings(
        overrides={
            "home": str(tmp_path / "home"),
            "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": topics},
        }
    )
    ensure_topics(
        broker.bootstrap_servers,
        {s.kafka.topics.documents: 2, s.kafka.topics.images: 1, s.kafka.topics.dead_letter: 1},
    )
    return s
