"""`riverbed demo` / `make demo`: the main job end to end on embedded defaults.

# BROKER: start (or reuse) the embedded Kafka, create the topics
# RAY: start (or reuse) the local Ray head
# PRODUCE: the sample corpus onto the documents topic, keyed by id
# INGEST: Kafka → chunk → embed → shards until every record is committed
# STATS: what the index now holds, read from the shard stores and the broker
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import Pipeline, Progress
from cluster.producer import EnvelopeProducer, read_records
from cluster.ray_runtime import connect
from cluster.stats import index_stats
from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(settings: Settings, sample: Path, json_output: bool = False) -> int:
    corpus = sample / "corpus.jsonl" if sample.is_dir() else sample
    if not corpus.exists():
        raise ConfigError(f"sample corpus {corpus} not found (run from the repository root, or pass --data)")
    t0 = time.monotonic()

    # BROKER
    servers = bootstrap_servers(settings)
    topics = settings.kafka.topics
    ensure_topics(servers, topic_specs(topics), max_message_bytes=settings.kafka.max_record_bytes)
    _say(f"Kafka    {servers}  (ready in {time.monotonic() - t0:.1f} s)")

    # RAY
    address = connect(settings)
    import ray

    _say(f"Ray      {address}  ({ray.cluster_resources().get('CPU', 0):g} logical CPUs)")

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
        producer.flush()
    finally:
        producer.close()
    _say(f"Produced {sent} documents to {topics.documents}, skipped {skipped}")

    # INGEST
    pipeline = Pipeline(settings)
    pipeline.start()

    def show(p: Progress) -> None:
        print(
            f"\r  ingest [{p.elapsed_s:5.1f}s] documents {p.total('documents')}  unchanged "
            f"{p.total('unchanged')}  chunks {p.total('chunks')}  lag {p.lag}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    try:
        pipeline.wait_idle(on_progress=show, interval_s=0.5)
    finally:
        results = pipeline.stop()
        print(file=sys.stderr)
    embedded = sum(r.get("chunks", 0) for r in results)
    unchanged = sum(r.get("unchanged", 0) for r in results)
    _say(f"Ingested: {embedded} chunks embedded, {unchanged} documents unchanged since the last run")

    # STATS
    stats = index_stats(settings)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    if json_output:
        print(json.dumps(stats, indent=2))
    else:
        print(
            f"index {stats['index']}: {stats['documents']} documents, {stats['chunks']} chunks "
            f"(per shard {stats['chunks_per_shard']}), dead letters {stats['dead_letters']['total']}, "
            f"lag {stats['lag']}, in {stats['seconds']} s"
        )
    return 0 if stats["lag"] == 0 and stats["documents"] >= sent else 1
