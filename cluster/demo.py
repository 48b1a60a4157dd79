"""`riverbed demo` / `make demo`: the main job end to end on embedded defaults.

# BROKER: start (or reuse) the embedded Kafka, create the topics
# RAY: start (or reuse) the local Ray head
# PRODUCE: the sample corpus onto the documents topic, keyed by id
# CONSUME: read it back with a consumer group, committing offsets, and count what arrived
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path

from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.producer import EnvelopeProducer, read_records
from cluster.ray_runtime import connect
from schemas.envelope import decode_record
from schemas.errors import ConfigError, PoisonMessageError
from schemas.settings import Settings

log = logging.getLogger(__name__)


def consume_all(
    servers: str, topic: str, group: str, expected: int, timeout_s: float = 120.0
) -> dict[str, int]:
    """Reads ``topic`` from the group's committed offsets until ``expected`` records arrived;
    commits after each poll. Returns counts by outcome."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="riverbed-demo",
    )
    counts = {"records": 0, "documents": 0, "deletes": 0, "invalid": 0}
    ids: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while counts["records"] < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    counts["records"] += 1
                    try:
                        envelope = decode_record(record.key, record.value)
                    except PoisonMessageError:
                        counts["invalid"] += 1
                        continue
                    counts["deletes" if envelope.is_delete else "documents"] += 1
                    ids.add(envelope.id)
            consumer.commit()
    finally:
        consumer.close()
    counts["distinct_ids"] = len(ids)
    return counts


def run_demo(settings: Settings, sample: Path, json_output: bool = False) -> int:
    corpus = sample / "corpus.jsonl" if sample.is_dir() else sample
    if not corpus.exists():
        raise ConfigError(f"sample corpus {corpus} not found (run from the repository root, or pass --data)")
    t0 = time.monotonic()

    # BROKER
    servers = bootstrap_servers(settings)
    topics = settings.kafka.topics
    ensure_topics(servers, topic_specs(topics), max_message_bytes=settings.kafka.max_record_bytes)
    t_kafka = time.monotonic() - t0
    print(f"Kafka   {servers}  (ready in {t_kafka:.1f} s)", file=sys.stderr)

    # RAY
    address = connect(settings)
    import ray

    print(f"Ray     {address}  CPUs={ray.cluster_resources().get('CPU', 0):g}", file=sys.stderr)

    # PRODUCE
    producer = EnvelopeProducer(servers, settings.kafka.max_record_bytes)
    sent = skipped = 0
    try:
        for record in read_records(corpus):
            if record.envelope is None:
                skipped += 1
                log.warning("skipped %s: %s", record.location, record.error)
                continue
            producer.send(topics.documents, record.envelope)
            sent += 1
        delivered = producer.flush()
    finally:
        producer.close()
    partitions = sorted({p for _, p, _ in delivered})
    print(
        f"Produced {sent} documents to {topics.documents} ({len(partitions)} partitions), skipped {skipped}",
        file=sys.stderr,
    )

    # CONSUME
    group = f"riverbed-demo-{uuid.uuid4().hex[:8]}"
    counts = consume_all(servers, topics.documents, group, expected=sent)
    summary = {
        "kafka": servers,
        "ray": address,
        "produced": sent,
        "skipped": skipped,
        "consumed": counts,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"produced {sent}, skipped {skipped}; consumed back {counts['records']} records "
            f"({counts['documents']} documents) in {summary['seconds']} s"
        )
    ok = counts["records"] >= sent
    return 0 if ok else 1
