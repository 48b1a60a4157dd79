"""`riverbed bench freshness`: how long after a document is produced it can be found, at a steady rate.

# PIPELINE: a fresh index and topic; Kafka → sources → chunker → embedder actor → shards, as
#   `riverbed ingest` runs it; warmed up first (a few documents made searchable and not counted)
# LOAD: SQuAD passages (copies under new ids when the run needs more), produced at ``--rate``
#   documents per second for ``--seconds``, each send on a fixed schedule (open loop: a slow
#   pipeline does not slow the producer down, so queueing shows up as latency)
# SEARCHABLE: every chunk of the document is in its shards (the chunk counts the shards report sum
#   to the document's ``n_chunks``): from then on, searches see it. The shards are asked every
#   ``POLL_S``, which bounds the measurement's resolution
# LATENCY: from the producer's send call to the first poll that saw the document searchable
# The index and its topics are dropped at the end.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cluster.bench.ingest import load_corpus
from cluster.bench.report import machine, write_plot, write_table
from cluster.pipeline import Pipeline, drop_index
from cluster.producer import EnvelopeProducer
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError, RetryableError
from schemas.settings import Settings, load_settings

POLL_S = 0.05
WARM_UP_DOCS = 8
CORPUS = Path(__file__).resolve().parents[2] / "data" / "squad-v1.1-dev" / "corpus.jsonl"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def freshness_settings(base: Settings) -> Settings:
    """A dedicated index and topics, so the bench never touches the user's index."""
    run = uuid.uuid4().hex[:8]
    dump = base.model_dump(mode="json")
    dump["index"] = {**dump["index"], "name": f"bench-fresh-{run}"}
    dump["kafka"]["topics"] = {
        **dump["kafka"]["topics"],
        "documents": f"bench.fresh-{run}.documents",
        "dead_letter": f"bench.fresh-{run}.dead-letter",
    }
    return load_settings(overrides=dump)


def documents(n: int, prefix: str, corpus: Path = CORPUS) -> list[DocumentEnvelope]:
    """``n`` passages of the corpus under ids ``<prefix>/<copy>/<id>`` (copies when n exceeds it)."""
    base = load_corpus(corpus, 1)
    return [
        base[i % len(base)].model_copy(update={"id": f"{prefix}/{i // len(base)}/{base[i % len(base)].id}"})
        for i in range(n)
    ]


class Visibility:
    """Which documents every shard has all the chunks of, asked of the shard actors."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards

    def searchable(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        answers = ray.get([sh.documents.remote(ids) for sh in self.shards], timeout=60)
        out = set()
        for doc_id in ids:
            chunks = sum(a[doc_id]["chunks"] for a in answers)
            n_chunks = next((a[doc_id]["n_chunks"] for a in answers if "n_chunks" in a[doc_id]), None)
            if n_chunks is not None and chunks >= n_chunks:
                out.add(doc_id)
        return out


def wait_searchable(
    visibility: Visibility, sent: dict[str, float], seen: dict[str, float], deadline: float
) -> None:
    """Polls until every sent document is seen or ``deadline`` (monotonic) passes; records the
    time each was first seen in ``seen``."""
    while True:
        pending = [d for d in sent if d not in seen]
        if not pending:
            return
        now = time.monotonic()
        for doc_id in visibility.searchable(pending):
            seen[doc_id] = now
        if now > deadline:
            return
        time.sleep(POLL_S)


def bench_freshness(base: Settings, rate: float, seconds: float, out_dir: Path) -> dict[str, Any]:
    if rate <= 0 or seconds <= 0:
        raise ConfigError(f"--rate and --seconds must be positive (got {rate}, {seconds})")
    settings = freshness_settings(base)
    topic = settings.kafka.topics.documents
    n = max(1, round(rate * seconds))
    docs = documents(WARM_UP_DOCS + n, settings.index.name)
    warm, load = docs[:WARM_UP_DOCS], docs[WARM_UP_DOCS:]

    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        visibility = Visibility(pipeline.shards)
        producer = EnvelopeProducer(pipeline.servers, settings.kafka.max_record_bytes, "riverbed-freshness")
        try:
            # WARM-UP: consumer group joined, models loaded, first batches through
            _say(f"warming up with {WARM_UP_DOCS} documents")
            sent_warm = {}
            for doc in warm:
                producer.send(topic, doc)
                sent_warm[doc.id] = time.monotonic()
            producer.flush()
            seen_warm: dict[str, float] = {}
            wait_searchable(visibility, sent_warm, seen_warm, time.monotonic() + 300)
            if len(seen_warm) < len(warm):
                raise RetryableError(
                    f"warm-up: {len(warm) - len(seen_warm)} documents never became searchable"
                )

            # LOAD
            _say(f"producing {n} documents at {rate:g}/s for {seconds:g} s")
            sent: dict[str, float] = {}
            seen: dict[str, float] = {}
            failure: list[BaseException] = []

            def produce() -> None:
                try:
                    start = time.monotonic()
                    for i, doc in enumerate(load):
                        due = start + i / rate
                        time.sleep(max(0.0, due - time.monotonic()))
                        sent[doc.id] = time.monotonic()
                        producer.send(topic, doc)
                        if producer.pending >= max(1, int(rate)):  # confirm about once a second
                            producer.flush()
                    producer.flush()
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)

            thread = threading.Thread(target=produce, name="freshness-producer", daemon=True)
            t0 = time.monotonic()
            thread.start()
            last_report = t0
            while thread.is_alive():
                now = time.monotonic()
                for doc_id in visibility.searchable([d for d in list(sent) if d not in seen]):
                    seen[doc_id] = now
                if now - last_report >= 10:
                    _say(f"  {now - t0:.0f} s: {len(sent)} sent, {len(seen)} searchable")
                    last_report = now
                time.sleep(POLL_S)
            if failure:
                raise failure[0]
            wait_searchable(visibility, sent, seen, time.monotonic() + max(60.0, seconds))
            produce_s = max(sent.values()) - min(sent.values()) if len(sent) > 1 else 0.0
        finally:
            producer.close()
    finally:
        pipeline.stop()
        drop_index(settings, [topic, settings.kafka.topics.dead_letter])

    latencies = np.array([seen[d] - sent[d] for d in sent if d in seen]) * 1000
    missing = len(sent) - len(latencies)
    if not len(latencies):
        raise RetryableError("no document became searchable")
    t_sent = np.array([sent[d] - t0 for d in sent if d in seen])
    q = {p: float(np.percentile(latencies, p)) for p in (50, 90, 99)}
    result: dict[str, Any] = {
        "rate_target": rate,
        "rate_achieved": round(len(sent) / produce_s, 2) if produce_s else None,
        "seconds": seconds,
        "documents": len(sent),
        "searchable": len(latencies),
        "missing": missing,
        "p50_ms": round(q[50], 1),
        "p90_ms": round(q[90], 1),
        "p99_ms": round(q[99], 1),
        "max_ms": round(float(latencies.max()), 1),
        "mean_ms": round(float(latencies.mean()), 1),
        "poll_s": POLL_S,
        "embed_max_wait_ms": settings.embed.max_wait_ms,
        "shards": settings.index.n_shards,
        "machine": machine(),
    }
    # per 5-second window of send time: how latency moves while the load runs
    edges = np.arange(0, max(float(t_sent.max()), 5.0) + 5, 5.0)
    windows = [(float(lo), latencies[(t_sent >= lo) & (t_sent < hi)]) for lo, hi in pairwise(edges)]
    windows = [(lo, w) for lo, w in windows if len(w)]
    result["windows"] = [
        {
            "from_s": lo,
            "documents": len(w),
            "p50_ms": float(np.percentile(w, 50)),
            "p99_ms": float(np.percentile(w, 99)),
        }
        for lo, w in windows
    ]
    result["summary"] = (
        f"freshness at {rate:g} documents/s for {seconds:g} s ({len(sent)} documents): produce → searchable "
        f"p50 {q[50]:.0f} ms, p90 {q[90]:.0f} ms, p99 {q[99]:.0f} ms, max {latencies.max():.0f} ms"
        f"{f'; {missing} never searchable' if missing else ''} (report in {out_dir}/freshness.md)"
    )
    write_table(
        out_dir,
        "freshness",
        ["measure", "value"],
        [
            [
                "documents produced (target rate, achieved)",
                f"{len(sent)} ({rate:g}/s, {result['rate_achieved']}/s)",
            ],
            ["searchable / never", f"{len(latencies)} / {missing}"],
            ["produce → searchable p50", f"{q[50]:.0f} ms"],
            ["p90", f"{q[90]:.0f} ms"],
            ["p99", f"{q[99]:.0f} ms"],
            ["max", f"{latencies.max():.0f} ms"],
            ["shards asked every", f"{POLL_S * 1000:.0f} ms"],
        ],
    )
    write_plot(
        out_dir,
        "freshness",
        f"produce → searchable at {rate:g} documents/s",
        {
            "p50 ms": ([lo for lo, _ in windows], [float(np.percentile(w, 50)) for _, w in windows]),
            "p99 ms": ([lo for lo, _ in windows], [float(np.percentile(w, 99)) for _, w in windows]),
        },
        "seconds since the load started (5 s windows of send time)",
    )
    (out_dir / "freshness.json").write_text(json.dumps(result, indent=2, default=str))
    return result
