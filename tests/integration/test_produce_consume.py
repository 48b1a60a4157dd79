"""`riverbed produce` (the real CLI process) onto the real broker, consumed back by a group."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from kafka import KafkaConsumer, TopicPartition

from cluster.kafka_admin import committed_offsets
from schemas.envelope import decode_record
from tests.integration.conftest import REPO


def test_produce_cli_then_consume_every_record_and_key(tmp_path, settings, broker):
    topic = settings.kafka.topics.documents
    lines = []
    for i in range(300):
        env = {
            "kind": "document",
            "id": f"doc-{i}",
            "text": f"body {i} ünïcode",
            "title": f"T{i}",
            "metadata": {"n": i, "even": i % 2 == 0},
        }
        lines.append(json.dumps(env, ensure_ascii=False))
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({"kind": "document", "id": "no-text"}))
    lines.append(json.dumps({"kind": "document", "id": "doc-3", "op": "delete"}))
    # an image envelope goes to the images topic, not the documents topic
    images = settings.kafka.topics.images
    lines.append(
        json.dumps({"kind": "image", "id": "img-1", "image_b64": "iVBORw0KGgo=", "caption": "a cap"})
    )
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "produce",
            str(path),
            "--json",
            "--quiet",
            "--bootstrap-servers",
            broker.bootstrap_servers,
            "--home",
            str(settings.home),
            "--set",
            f"kafka.topics.documents={topic}",
            "--set",
            f"kafka.topics.images={images}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"sent": 302, "topics": {topic: 301, images: 1}, "skipped": 2}
    assert "docs.jsonl:11" in proc.stderr and "docs.jsonl:21" in proc.stderr  # bad lines named

    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    received = []
    try:
        for _ in range(60):
            for batch in consumer.poll(timeout_ms=500).values():
                received.extend(batch)
            consumer.commit()
            if len(received) >= 301:
                break
    finally:
        consumer.close()
    assert len(received) == 301
    by_id: dict[str, list] = {}
    for rec in received:
        env = decode_record(rec.key, rec.value)
        assert rec.key.decode() == env.id
        by_id.setdefault(env.id, []).append((rec.partition, rec.offset, env))
    assert set(by_id) == {f"doc-{i}" for i in range(300)}
    # doc-3's upsert and delete share a partition, in order.
    (p1, o1, first), (p2, o2, second) = sorted(by_id["doc-3"], key=lambda x: x[1])
    assert p1 == p2 and o1 < o2 and first.op == "upsert" and second.is_delete
    env = by_id["doc-7"][0][2]
    assert env.text == "body 7 ünïcode" and env.metadata == {"n": 7, "even": False}

    # The group's committed offsets cover every record.
    committed = committed_offsets(broker.bootstrap_servers, group)
    probe = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers)
    try:
        ends = probe.end_offsets([TopicPartition(topic, p) for p in range(2)])
    finally:
        probe.close()
    assert committed == {topic: {tp.partition: offset for tp, offset in ends.items()}}

    image_consumer = KafkaConsumer(
        images,
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        (image,) = [decode_record(r.key, r.value) for r in image_consumer]
    finally:
        image_consumer.close()
    assert image.kind == "image" and image.id == "img-1" and image.caption == "a cap"
