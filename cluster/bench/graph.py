"""`riverbed bench graph`: knowledge-graph extraction throughput next to raw ``nlp.pipe``, and the
latency of graph queries over HTTP.

# DATA: the corpus's documents (SQuAD dev by default), chunked by the index's chunker: the chunk
#   texts both sides extract from
# RAW: the extractor's spaCy pipeline in this process, ``nlp.pipe`` over those texts in batches of
#   ``graph.batch_size`` (one thread: spaCy's CPU ops are single-threaded), its output discarded
# PIPELINE: the documents produced to a fresh topic and ingested once without the graph (the vector
#   side, not timed); then an ingest with ``graph.enabled``, in which only the graph's consumer
#   group has records left: Kafka → graph source → chunk → extractor actor → graph shards, timed
#   from when every source consumes until the graph's group has committed every record (as RAW
#   leaves out loading the pipeline, this leaves out the actors' start and the group's join, a
#   fixed cost of seconds whatever the corpus)
# QUERIES: `riverbed serve` over that index; ``POST /v1/graph/query`` with ``{"entity", "hops": 2}``
#   for entities drawn (by ``--seed``) from every entity with a relation, and for the ten most
#   connected (the worst case: the largest neighbourhoods), one client, one request at a time
# Afterwards the throwaway index, its graph and its topics are dropped.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from actors.chunker import Chunker
from actors.graph_extract import Extractor
from actors.graph_query import degree
from cluster.bench.ingest import load_corpus
from cluster.bench.query import percentile
from cluster.bench.report import machine, write_ratio_bars, write_report
from cluster.graph_files import graph_stats, read_graph
from cluster.pipeline import Pipeline, drop_index, ingest_documents, release_shards
from cluster.serving import start_serving
from schemas.envelope import DocumentEnvelope
from schemas.settings import Settings, load_settings

HUBS = 10


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def graph_run_settings(base: Settings, name: str, graph: bool) -> Settings:
    """``base`` for the throwaway index ``name`` (topics of its own, no images), with the graph
    built or not."""
    dump = base.model_dump(mode="json")
    dump["index"]["name"] = name
    dump["images"]["ingest"] = False
    dump["graph"]["enabled"] = graph
    dump["serve"]["ingest"] = False
    dump["kafka"]["topics"].update(
        {kind: f"{name}.{kind}" for kind in ("documents", "images", "dead_letter")}
    )
    return load_settings(overrides=dump)


def bench_graph(base: Settings, corpus: Path, n_queries: int, seed: int, out_dir: Path) -> dict[str, Any]:
    name = f"bench-graph-{uuid.uuid4().hex[:8]}"
    plain, settings = (graph_run_settings(base, name, graph) for graph in (False, True))
    docs = load_corpus(corpus, 1)
    chunker = Chunker(settings.chunk, settings.embed.model)
    texts = [c.text for d in chunker.chunk_batch(docs) for c in d.chunks]
    _say(f"data: {len(docs)} documents, {len(texts)} chunks")

    # RAW
    extractor = Extractor(settings.graph)
    extractor.warm_up()
    # spaCy's pipelines compute on one thread (thinc's CPU ops on blis), as the extractor actor does
    list(extractor.nlp.pipe(texts[: settings.graph.batch_size]))  # warm-up: first calls allocate
    t0 = time.perf_counter()
    for _ in extractor.nlp.pipe(texts, batch_size=settings.graph.batch_size):
        pass
    raw_s = time.perf_counter() - t0
    raw_rate = len(texts) / raw_s
    _say(f"raw nlp.pipe: {raw_rate:.1f} chunks/s")

    topics = settings.kafka.topics
    try:
        # PIPELINE
        pipe_s = _pipeline_run(plain, settings, docs)
        pipe_rate = len(texts) / pipe_s
        _say(f"pipeline: {pipe_rate:.1f} chunks/s")
        read = read_graph(settings)
        stats = graph_stats(settings, top=0, read=read)

        # QUERIES
        graph = read[0]
        related = sorted(k for k in graph.nodes if degree(graph, k) > 0)
        drawn = random.Random(seed).sample(related, min(n_queries, len(related)))
        hubs = sorted(related, key=lambda k: (-degree(graph, k), k))[:HUBS]
        serving = start_serving(settings, ingest=False)
        try:
            with httpx.Client(base_url=serving.url, timeout=120) as client:
                for key in drawn[:10]:  # warm-up: the replicas' first calls
                    _query(client, key)
                sampled = _latencies(client, drawn)
                hub = _latencies(client, hubs)
        finally:
            serving.stop()
    finally:
        release_shards(settings.graph_side())
        shutil.rmtree(settings.graph_side().data_dir, ignore_errors=True)
        drop_index(settings, [topics.documents, topics.images, topics.dead_letter])
    _say(
        f"2-hop queries: p50 {sampled['p50_ms']:.1f} ms, p99 {sampled['p99_ms']:.1f} ms; "
        f"hubs p50 {hub['p50_ms']:.1f}"
    )

    result: dict[str, Any] = {
        "corpus": str(corpus),
        "documents": len(docs),
        "chunks": len(texts),
        "model": extractor.identity,
        "batch_size": settings.graph.batch_size,
        "raw_s": round(raw_s, 2),
        "raw_chunks_per_s": round(raw_rate, 1),
        "pipeline_s": round(pipe_s, 2),
        "pipeline_chunks_per_s": round(pipe_rate, 1),
        "ratio": round(pipe_rate / raw_rate, 3),
        "entities": stats["entities"],
        "edges": stats["edges"],
        "edges_per_chunk": stats["edges_per_chunk"],
        "queries_2_hops": sampled,
        "queries_2_hops_hubs": hub,
        "machine": machine(),
    }
    rows = [
        ("chunks", f"{len(texts)} ({len(docs)} documents of {corpus})"),
        ("raw `nlp.pipe` (1 thread)", f"{raw_rate:.1f} chunks/s"),
        ("pipeline (Kafka → chunk → extract → graph shards, committed)", f"{pipe_rate:.1f} chunks/s"),
        ("ratio pipeline / raw", f"{result['ratio']:.2f}"),
        (
            "entities / edges / edges per chunk",
            f"{stats['entities']} / {stats['edges']} / {stats['edges_per_chunk']}",
        ),
        (
            f"`/v1/graph/query` 2 hops, {sampled['queries']} drawn entities: p50 / p99",
            f"{sampled['p50_ms']:.1f} / {sampled['p99_ms']:.1f} ms "
            f"({sampled['mean_nodes']:.0f} entities each)",
        ),
        (
            f"the same for the {HUBS} most connected entities: p50 / max",
            f"{hub['p50_ms']:.1f} / {hub['max_ms']:.1f} ms",
        ),
    ]
    write_report(out_dir, "graph", result, rows)
    title = f"knowledge-graph extraction, {len(texts)} chunks"
    write_ratio_bars(out_dir, "graph", title, "chunks/s", ("raw nlp.pipe", raw_rate), pipe_rate)
    return result


def _pipeline_run(plain: Settings, settings: Settings, docs: list[DocumentEnvelope]) -> float:
    """Seconds the graph side takes to consume ``docs`` once the vector side has (see the module)."""
    ingest_documents(plain, docs)  # produces them, and fills the vector side
    pipeline = Pipeline(settings)
    try:
        pipeline.start()
        pipeline.wait_consuming(poll_s=0.05)
        t0 = time.perf_counter()
        # each progress check asks the broker for two groups' offsets: every 0.2 s that took 5 of the
        # run's CPU seconds (the driver and the broker, beside the extractor); every second: at most
        # a second late, on a run of a minute or more
        pipeline.wait_idle(interval_s=1.0)
        return time.perf_counter() - t0
    finally:
        pipeline.stop()


def _query(client: httpx.Client, key: str) -> int:
    r = client.post("/v1/graph/query", json={"entity": key, "hops": 2, "limit": 50})
    r.raise_for_status()
    return len(r.json()["nodes"])


def _latencies(client: httpx.Client, keys: list[str]) -> dict[str, Any]:
    seconds, nodes = [], []
    for key in keys:
        t0 = time.perf_counter()
        nodes.append(_query(client, key))
        seconds.append(time.perf_counter() - t0)
    return {
        "queries": len(keys),
        "p50_ms": round(percentile(seconds, 50) * 1000, 1),
        "p99_ms": round(percentile(seconds, 99) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
        "mean_nodes": sum(nodes) / len(nodes),
    }
