"""Every metric the HTTP app exports, in one place (STYLE.md principle 8), in Prometheus format.

Served by ``GET /metrics`` on the app's own port. Request metrics are the answering ingress
replica's (one replica by default; with several, scrape each or use Ray's metrics export).
Ingest figures (consumer lag, committed offsets, chunks per shard, dead letters, the sources'
counters) are read from the broker and the actors at scrape time, so they describe the whole
pipeline whichever replica answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HttpMetrics:
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

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, ingest: Mapping[str, Any] | None) -> bytes:
        """The request metrics, plus the ingest snapshot ``ingest`` (see :func:`ingest_metrics`)."""
        text = generate_latest(self.registry)
        if ingest is not None:
            extra = CollectorRegistry()
            extra.register(_Snapshot(ingest_metrics(ingest)))
            text += generate_latest(extra)
        return text


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
    """Prometheus families from ``{"index", "committed": {topic: {p: off}}, "ends": {...},
    "shards": [shard stats], "sources": [source stats], "dead_letters": {reason: n}}``."""
    index = str(snapshot.get("index", ""))
    lag = GaugeMetricFamily("riverbed_consumer_lag", "Records not yet committed, per partition",
                            labels=["index", "topic", "partition"])  # fmt: skip
    committed = GaugeMetricFamily("riverbed_committed_offset", "Committed offset, per partition",
                                  labels=["index", "topic", "partition"])  # fmt: skip
    ends: Mapping[str, Mapping[int, int]] = snapshot.get("ends", {})
    done: Mapping[str, Mapping[int, int]] = snapshot.get("committed", {})
    for topic, parts in ends.items():
        for partition, end in parts.items():
            position = done.get(topic, {}).get(partition, 0)
            lag.add_metric([index, topic, str(partition)], max(0, end - position))
            committed.add_metric([index, topic, str(partition)], position)
    chunks = GaugeMetricFamily("riverbed_index_chunks", "Chunks stored, per shard", labels=["index", "shard"])
    documents = GaugeMetricFamily("riverbed_index_documents", "Documents with chunks, per shard",
                                  labels=["index", "shard"])  # fmt: skip
    for shard in snapshot.get("shards", []):
        chunks.add_metric([index, str(shard["shard"])], shard["chunks"])
        documents.add_metric([index, str(shard["shard"])], shard["documents"])
    dead = CounterMetricFamily("riverbed_dead_letters", "Records sent to the dead-letter topic, by reason",
                               labels=["index", "reason"])  # fmt: skip
    for reason, n in snapshot.get("dead_letters", {}).items():
        dead.add_metric([index, reason], n)
    ingest = CounterMetricFamily("riverbed_ingest", "Ingest counters of the running sources, by kind",
                                 labels=["index", "source", "kind"])  # fmt: skip
    queue = GaugeMetricFamily("riverbed_ingest_in_flight_batches", "Batches polled and not yet written",
                              labels=["index", "source"])  # fmt: skip
    for i, source in enumerate(snapshot.get("sources", [])):
        for kind in ("records", "documents", "chunks", "deletes", "unchanged", "batches"):
            ingest.add_metric([index, str(i), kind], float(source.get(kind, 0)))
        queue.add_metric([index, str(i)], float(source.get("in_flight_batches", 0)))
    return [lag, committed, chunks, documents, dead, ingest, queue]
