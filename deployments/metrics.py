"""What the HTTP app tells operators: every metric it exports (Prometheus text) and the health verdict.

Every metric is defined here, in one place. ``GET /metrics`` serves them on the app's own port.
Request metrics are the answering ingress replica's (one replica by default; with several, scrape
each or use Ray's metrics export). Ingest and index figures (consumer lag, committed offsets,
chunks and vectors per shard, shard health, dead letters, the sources' counters, retries and
stalls) are read from the broker and the actors at scrape time, so they describe the whole
pipeline whichever replica answers. Every figure is O(1) for the actors: nothing here scans
documents.

``GET /healthz`` answers :func:`health_report`'s verdict over the same shard and source figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SHARD_STATUSES = ("ok", "degraded", "unavailable")
SOURCE_COUNTERS = ("records", "documents", "chunks", "deletes", "unchanged", "batches")


class HttpMetrics:
    """Request counts and latencies of this process. Thread-safe (prometheus_client's own locks)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "riverbed_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "riverbed_http_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.batch_size = Histogram(
            "riverbed_query_batch_size",
            "Queries per batch of a stage of this process's search path (embed: the query model's "
            "forward pass; search: one search of the shards)",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batched(self, stage: str) -> Callable[[int], None]:
        """What a :class:`~deployments.stage_batching.Batcher` of ``stage`` reports its batch sizes to."""
        return self.batch_size.labels(stage).observe

    def render(self, ingest: Mapping[str, Any] | None) -> bytes:
        """The request metrics, plus the ingest snapshot ``ingest`` (see :func:`ingest_metrics`)."""
        text = generate_latest(self.registry)
        if ingest is not None:
            text += render_snapshot(ingest)
        return text


def render_snapshot(snapshot: Mapping[str, Any]) -> bytes:
    """The Prometheus text of :func:`ingest_metrics` for ``snapshot``."""
    extra = CollectorRegistry()
    extra.register(_Snapshot(ingest_metrics(snapshot)))
    return generate_latest(extra)


_HTTP: HttpMetrics | None = None


def http_metrics() -> HttpMetrics:
    """This process's request metrics. Reached through this module, never through a global of the
    ingress module: Serve ships the ingress class and its app by value, with copies of the globals
    they name, so a module-level object there would not be the one the middleware updates."""
    global _HTTP
    if _HTTP is None:
        _HTTP = HttpMetrics()
    return _HTTP


class _Snapshot:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def ingest_metrics(snapshot: Mapping[str, Any]) -> list[Metric]:
    """Prometheus families from a snapshot of the pipeline:

    ``{"index", "committed": {topic: {partition: offset}}, "ends": {...}, "shards": [...],
    "sources": [...], "dead_letters": {reason: n}}``, where a shard entry is its health
    (``shard``, ``status``, ``problem``) with its figures when it answered them (``chunks``,
    ``vectors``, ``documents``), and a source entry is a running source's ``stats()``
    (``source``: its number; its counters; ``phase``, ``phase_s``, ``retries`` by phase,
    ``stalled``: what it waits for, or None). Missing keys are skipped (or count 0), so a
    snapshot from an older actor still renders."""
    index = str(snapshot.get("index", ""))
    return [
        *_offset_metrics(index, snapshot.get("committed", {}), snapshot.get("ends", {})),
        *_shard_metrics(index, snapshot.get("shards", [])),
        *_source_metrics(index, snapshot.get("sources", []), snapshot.get("dead_letters", {})),
    ]


def _offset_metrics(
    index: str, done: Mapping[str, Mapping[int, int]], ends: Mapping[str, Mapping[int, int]]
) -> list[Metric]:
    lag = GaugeMetricFamily("riverbed_consumer_lag", "Records not yet committed, per partition",
                            labels=["index", "topic", "partition"])  # fmt: skip
    committed = GaugeMetricFamily("riverbed_committed_offset", "Committed offset, per partition",
                                  labels=["index", "topic", "partition"])  # fmt: skip
    for topic, parts in ends.items():
        for partition, end in parts.items():
            position = done.get(topic, {}).get(partition, 0)
            lag.add_metric([index, topic, str(partition)], max(0, end - position))
            committed.add_metric([index, topic, str(partition)], position)
    return [lag, committed]


def _shard_metrics(index: str, shards: Sequence[Mapping[str, Any]]) -> list[Metric]:
    labels = ["index", "shard"]
    chunks = GaugeMetricFamily("riverbed_index_chunks", "Chunks stored, per shard", labels=labels)
    vectors = GaugeMetricFamily("riverbed_index_vectors", "Vectors in the shard's vector structure "
                                "(counted apart from the store's chunks; they should be equal)",
                                labels=labels)  # fmt: skip
    documents = GaugeMetricFamily("riverbed_index_documents", "Documents whose registry row this shard "
                                  "holds (the sum over shards is the number of live documents)",
                                  labels=labels)  # fmt: skip
    status = GaugeMetricFamily("riverbed_shard_status", "1 for the shard's current health status "
                               "(ok, degraded, unavailable), 0 for the others",
                               labels=[*labels, "status"])  # fmt: skip
    for shard in shards:
        key = [index, str(shard["shard"])]
        for family, field in ((chunks, "chunks"), (vectors, "vectors"), (documents, "documents")):
            if shard.get(field) is not None:
                family.add_metric(key, float(shard[field]))
        current = shard.get("status", "ok")
        for name in SHARD_STATUSES:
            status.add_metric([*key, name], 1.0 if name == current else 0.0)
    return [chunks, vectors, documents, status]


def _source_metrics(
    index: str, sources: Sequence[Mapping[str, Any]], dead_letters: Mapping[str, int]
) -> list[Metric]:
    dead = CounterMetricFamily("riverbed_dead_letters", "Records sent to the dead-letter topic, by reason",
                               labels=["index", "reason"])  # fmt: skip
    for reason, n in dead_letters.items():
        dead.add_metric([index, reason], n)
    ingest = CounterMetricFamily("riverbed_ingest", "Ingest counters of the running sources, by kind",
                                 labels=["index", "source", "kind"])  # fmt: skip
    queue = GaugeMetricFamily("riverbed_ingest_in_flight_batches", "Batches polled and not yet written",
                              labels=["index", "source"])  # fmt: skip
    by_phase = ["index", "source", "phase"]
    retries = CounterMetricFamily("riverbed_ingest_retries", "Transient failures retried by the running "
                                  "sources, by the phase that failed", labels=by_phase)  # fmt: skip
    stalled = GaugeMetricFamily("riverbed_ingest_stalled", "1 while the source is stalled (retrying or "
                                "waiting) in the phase named, else 0", labels=by_phase)  # fmt: skip
    phase_s = GaugeMetricFamily("riverbed_ingest_phase_seconds", "Seconds the source has been in its "
                                "current phase", labels=by_phase)  # fmt: skip
    for i, source in enumerate(sources):
        number = str(source.get("source", i))
        for kind in SOURCE_COUNTERS:
            ingest.add_metric([index, number, kind], float(source.get(kind, 0)))
        queue.add_metric([index, number], float(source.get("in_flight_batches", 0)))
        for phase, n in sorted((source.get("retries") or {}).items()):
            retries.add_metric([index, number, str(phase)], float(n))
        phase = str(source.get("phase") or "unknown")
        stalled.add_metric([index, number, phase], 1.0 if source.get("stalled") else 0.0)
        if source.get("phase_s") is not None:
            phase_s.add_metric([index, number, phase], float(source["phase_s"]))
    return [dead, ingest, queue, retries, stalled, phase_s]


def health_report(
    index: str,
    shards: Sequence[Mapping[str, Any]],
    sources: Sequence[Mapping[str, Any]] = (),
    source_problems: Sequence[str] = (),
    graph_shards: Sequence[Mapping[str, Any]] = (),
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of ``/healthz``.

    ``shards``: each shard's health (``shard``, ``status``, ``problem``, ``chunks``,
    ``vectors``); ``sources``: the running sources' ``stats()``; ``source_problems``: sources
    that run but did not answer. 200 ``{"status": "ok", ...}`` only when every shard is ok and
    no source is stalled; otherwise 503 with ``status`` ``unavailable`` (a shard cannot answer,
    so searches fail) or ``degraded`` (every shard answers, but one reports a problem such as a
    full disk, or ingest is stalled), ``problems`` naming each one, and the shared error object.
    ``graph_shards``: the knowledge graph's shards' health where the app serves a graph; one that
    is not ok leaves searches working, so the app is ``degraded`` (its graph routes answer 503).
    """
    problems: list[str] = []
    unavailable = not shards
    if not shards:
        problems.append(f"index {index!r} has no shards")
    for shard in shards:
        status = shard.get("status", "ok")
        if status != "ok":
            unavailable = unavailable or status == "unavailable"
            problems.append(f"shard {shard['shard']}: {status}: {shard.get('problem') or 'no reason given'}")
    for i, source in enumerate(sources):
        if source.get("stalled"):
            phase, seconds = source.get("phase") or "unknown", source.get("phase_s")
            since = f" for {float(seconds):g} s" if seconds is not None else ""
            problems.append(
                f"source {source.get('source', i)}: stalled in {phase}{since}: {source['stalled']}"
            )
    problems.extend(source_problems)
    for shard in graph_shards:
        status = shard.get("status", "ok")
        if status != "ok":
            problems.append(
                f"graph shard {shard['shard']}: {status}: {shard.get('problem') or 'no reason given'}"
            )
    body: dict[str, Any] = {
        "status": "unavailable" if unavailable else "degraded" if problems else "ok",
        "index": index,
        "shards": len(shards),
        "chunks": sum(int(s.get("chunks") or 0) for s in shards),
        "vectors": sum(int(s.get("vectors") or 0) for s in shards),
        "sources": len(sources),
        "problems": problems,
    }
    if not problems:
        return 200, body
    code = "index_unavailable" if unavailable else "index_degraded"
    body["error"] = {"code": code, "message": "; ".join(problems), "param": None}
    return 503, body
