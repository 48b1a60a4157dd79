"""The embedded broker's lifecycle on a home of its own (beside the session broker)."""

from __future__ import annotations

import uuid

from kafka import KafkaConsumer

from cluster.kafka_admin import ensure_topics
from cluster.local_kafka import LocalKafka
from cluster.producer import EnvelopeProducer
from schemas.envelope import DocumentEnvelope, decode_record
from schemas.settings import EmbeddedKafkaConfig


def test_start_is_idempotent_and_data_survives_restart(tmp_path, cache_dir):
    kafka = LocalKafka(EmbeddedKafkaConfig(), cache_dir, tmp_path)
    try:
        first = kafka.start()
        assert kafka.start() == first  # reused, not a second broker
        assert kafka.status()["running"] is True
        topic = f"restart-{uuid.uuid4().hex[:6]}"
        ensure_topics(first.bootstrap_servers, {topic: 1})
        producer = EnvelopeProducer(first.bootstrap_servers, 1 << 20)
        producer.send(topic, DocumentEnvelope(id="kept", text="survives a restart"))
        producer.flush()
        producer.close()

        assert kafka.stop() is True
        assert kafka.status()["running"] is False
        second = kafka.start()
        assert second.pid != first.pid
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=second.bootstrap_servers,
            auto_offset_reset="earliest",
            consumer_timeout_ms=10000,
        )
        try:
            records = [decode_record(r.key, r.value) for r in consumer]
        finally:
            consumer.close()
        assert [r.id for r in records] == ["kept"]
    finally:
        kafka.stop()
    assert kafka.state() is None
