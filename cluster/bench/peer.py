"""`riverbed bench peer`: Riverbed next to txtai, same corpus, model, device and questions, one run.

# CORPUS: the dataset's ``corpus.jsonl``. Riverbed embeds each passage's chunks (text only, no
#   title; ``chunk.max_tokens`` content tokens, ``chunk.overlap_tokens`` overlap). txtai embeds each
#   whole passage's text (no title either), which sentence-transformers truncates at the model's
#   ``max_seq_length``. With the defaults (254 content tokens + 2 specials = MiniLM's 256) a passage
#   under the limit is the same model input on both sides; a longer one is several chunks in
#   Riverbed and one truncated vector in txtai (``txtai_truncated_passages`` counts them).
# INDEX: corpus file -> searchable index, each in a fresh index, both exact (flat) inner product:
#   Riverbed's ``index.faiss.kind`` is forced to flat, txtai gets ``IDMap,Flat`` (its own default
#   up to 5,000 rows). Riverbed: read the envelopes, start the actors (the embedder actor imports
#   torch and loads the model; the sources join the consumer group), produce to a fresh topic,
#   Kafka -> chunk -> embed -> shard writes (SQLite, then FAISS) until every offset is committed.
#   txtai: read the JSON lines, import txtai (torch, transformers, sentence-transformers),
#   ``Embeddings(config)`` (loads the model), ``index()``. "model loaded" times start once Riverbed's
#   pipeline waits for records, and at ``index()`` for txtai. txtai runs on the device, and in the
#   precision, that Riverbed's embedder actor used (fp16 on CUDA). txtai's index lives in memory
#   (a temporary SQLite) until ``save()``, timed apart; Riverbed's is durable once committed. The
#   Ray head and the Kafka broker are up before any clock starts.
# QUERIES: a seeded sample of the held-out split (odd stable_hash of the query id), same list for both
# LATENCY: one query at a time in this process, the two systems interleaved: Riverbed =
#   ``Embedder.embed([q])`` + ``Searcher.search`` in vector mode over the shards as the app reads
#   them (``searchable``: read replicas of the live stores in this process, which asks each shard
#   actor where its store is; the actors themselves with ``serve.search.readers: false``);
#   txtai = ``Embeddings.search(q, k)`` with content enabled (it returns the text, as Riverbed
#   does). Then Riverbed again over in-process copies of its shards (no Ray hop at all).
# BATCHED: ``serve.search.embed_batch_size`` questions per call: ``Embedder.embed`` +
#   ``Searcher.search_many`` vs ``Embeddings.batchsearch``
# RECALL: recall@k and MRR@k per document from the k hits of the latency run (Riverbed's chunks
#   collapse to their document, so a multi-chunk passage can leave it fewer than k documents)
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from actors.embedder import Embedder
from actors.models import resolve_model
from cluster.bench.query import in_process, percentile
from cluster.bench.report import machine, write_bars, write_table
from cluster.eval.metrics import documents_in_order, mrr_at, recall_at
from cluster.eval.retrieval import load_qrels, load_queries, select
from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import Pipeline, drop_index
from cluster.producer import produce_all, read_records
from cluster.ray_runtime import connect
from deployments.retriever import RayShards, searchable
from deployments.searcher import Searcher
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError
from schemas.settings import Settings, load_settings

log = logging.getLogger(__name__)

WARM_UP_QUERIES = 8


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peer_settings(base: Settings, dataset: Path) -> Settings:
    """A fresh index and topic of their own (never the user's), searched exactly (flat)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", dataset.name.lower())[:20].strip("-_") or "data"
    name = f"peer-{slug}-{uuid.uuid4().hex[:6]}"
    dump = base.model_dump(mode="json")
    dump["index"] = {**dump["index"], "name": name, "faiss": {**dump["index"]["faiss"], "kind": "flat"}}
    dump["kafka"]["topics"] = {**dump["kafka"]["topics"], "documents": f"bench.{name}.documents"}
    return load_settings(overrides=dump)


def index_riverbed(settings: Settings, corpus: Path) -> dict[str, Any]:
    """Corpus file -> committed index through the real pipeline; seconds of each step."""
    t0 = time.perf_counter()
    docs = [r.envelope for r in read_records(corpus) if isinstance(r.envelope, DocumentEnvelope)]
    t_read = time.perf_counter()
    pipeline = Pipeline(settings)
    pipeline.start()
    t_started = time.perf_counter()
    try:
        device = str(ray.get(pipeline.embedders[0].describe.remote())["device"])
        _wait_assigned(pipeline)
        t_up = time.perf_counter()
        produce_all(pipeline.servers, settings.kafka.topics.documents, docs, settings.kafka.max_record_bytes)
        t_produced = time.perf_counter()
        pipeline.wait_idle(
            on_progress=lambda p: print(
                f"\r  chunks {p.total('chunks')}  lag {p.lag}   ", end="", file=sys.stderr, flush=True
            ),
            interval_s=0.1,
        )
        t_done = time.perf_counter()
    finally:
        results = pipeline.stop()
        print(file=sys.stderr)
    return {
        "device": device,
        "documents": len(docs),
        "chunks": sum(int(r.get("chunks", 0)) for r in results),
        "read_s": t_read - t0,
        "start_s": t_up - t_read,
        "start_steps_s": {**pipeline.startup, "sources_assigned": round(t_up - t_started, 2)},
        "produce_s": t_produced - t_up,
        "process_s": t_done - t_produced,
        "index_s": t_done - t0,
        "index_warm_s": t_done - t_up,
        "stop_s": time.perf_counter() - t_done,
    }


def _wait_assigned(pipeline: Pipeline, timeout_s: float = 120.0) -> None:
    """Until the sources hold every partition of the documents topic (constructed, group joined):
    from then on Riverbed is a running pipeline waiting for records, txtai's "model loaded"."""
    wanted = pipeline.settings.kafka.topics.documents_partitions
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = ray.get([src.stats.remote() for src in pipeline.sources], timeout=timeout_s)
        if len(set().union(*(s["assignment"] for s in stats))) >= wanted:
            return
        time.sleep(0.1)
    log.warning("sources hold not every partition after %.0f s; timing from now anyway", timeout_s)


def txtai_config(model_path: str, device: str) -> dict[str, Any]:
    """The txtai configuration matching Riverbed's: same model files, device and precision (fp16
    on CUDA, as Riverbed's embedder), exact FAISS, document text stored (content). No progress
    bar: sentence-transformers draws one per call when logging is at INFO (as the CLI's is), which
    costs txtai time and floods stderr."""
    config: dict[str, Any] = {
        "path": model_path,
        "method": "sentence-transformers",
        "backend": "faiss",
        "faiss": {"components": "IDMap,Flat"},
        "content": True,
        "gpu": device == "cuda",
        "encodeargs": {"show_progress_bar": False},
    }
    if device == "cuda":
        config["vectors"] = {"model_kwargs": {"dtype": "float16"}}
    return config


def index_txtai(config: dict[str, Any], corpus: Path) -> tuple[Any, dict[str, Any]]:
    """Corpus file -> in-memory txtai index; returns it and the seconds of each step. The import
    is on the clock (it loads torch, transformers and sentence-transformers), as the embedder
    actor's imports are on Riverbed's."""
    t0 = time.perf_counter()
    with corpus.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    documents = [(str(r.get("id", r.get("_id"))), r["text"], None) for r in rows]
    t_read = time.perf_counter()
    try:
        from txtai import Embeddings
    except ImportError as exc:
        raise ConfigError(
            "`riverbed bench peer` needs txtai: install requirements/lock.txt (make setup)"
        ) from exc
    t_imported = time.perf_counter()
    embeddings = Embeddings(config)
    t_loaded = time.perf_counter()
    embeddings.index(documents)
    t_done = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="riverbed-peer-") as tmp:
        embeddings.save(str(Path(tmp) / "index"))
        save_s = time.perf_counter() - t_done
    return embeddings, {
        "documents": len(documents),
        "rows": int(embeddings.count()),
        "read_s": t_read - t0,
        "import_s": t_imported - t_read,
        "load_s": t_loaded - t_imported,
        "index_s": t_done - t0,
        "index_warm_s": t_done - t_loaded,
        "save_s": save_s,
    }


def query_both(
    embedder: Embedder, searcher: Searcher, embeddings: Any, texts: list[str], k: int, batch: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency one at a time and batched throughput, the systems interleaved query by query
    (batch by batch), alternating which goes first, so that load from elsewhere hits both alike.
    Each system's latencies, batched seconds and ranked document ids per query (``ranked``)."""
    rb: dict[str, Any] = {"latencies": [], "ranked": [], "batched_s": 0.0}
    tx: dict[str, Any] = {"latencies": [], "ranked": [], "batched_s": 0.0}
    with asyncio.Runner() as runner:

        def riverbed(q: str) -> list[str]:
            v = embedder.embed([q])[0]
            hits = runner.run(searcher.search(q, v, k, None, "vector"))
            return documents_in_order(r.hit.document_id for r in hits)

        def txtai(q: str) -> list[str]:
            return [str(r["id"]) for r in embeddings.search(q, k)]

        for q in texts[:WARM_UP_QUERIES]:
            riverbed(q)
            txtai(q)
        for i, q in enumerate(texts):
            order = ((riverbed, rb), (txtai, tx)) if i % 2 == 0 else ((txtai, tx), (riverbed, rb))
            for run, out in order:
                t0 = time.perf_counter()
                ranked = run(q)
                out["latencies"].append(time.perf_counter() - t0)
                out["ranked"].append(ranked)

        def riverbed_many(part: list[str]) -> None:
            runner.run(searcher.search_many(part, embedder.embed(part), k, None, "vector"))

        def txtai_many(part: list[str]) -> None:
            embeddings.batchsearch(part, k)

        for i, lo in enumerate(range(0, len(texts), batch)):
            many = ((riverbed_many, rb), (txtai_many, tx))
            for run_many, out in many if i % 2 == 0 else many[::-1]:
                t0 = time.perf_counter()
                run_many(texts[lo : lo + batch])
                out["batched_s"] += time.perf_counter() - t0
    return rb, tx


def _measures(
    raw: dict[str, Any], qids: list[str], qrels: dict[str, dict[str, int]], k: int
) -> dict[str, Any]:
    n = len(qids)
    return {
        "p50_ms": percentile(raw["latencies"], 50) * 1000,
        "p99_ms": percentile(raw["latencies"], 99) * 1000,
        "batched_qps": n / raw["batched_s"],
        f"recall@{k}": sum(recall_at(r, qrels[q], k) for q, r in zip(qids, raw["ranked"], strict=True)) / n,
        f"mrr@{k}": sum(mrr_at(r, qrels[q], k) for q, r in zip(qids, raw["ranked"], strict=True)) / n,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def bench_peer(base: Settings, dataset: Path, n_queries: int, k: int, out_dir: Path) -> dict[str, Any]:
    corpus = dataset / "corpus.jsonl"
    for path in (corpus, dataset / "queries.jsonl", dataset / "qrels.tsv"):
        if not path.is_file():
            raise ConfigError(f"{path} not found: --dataset needs BEIR layout (corpus, queries, qrels)")
    settings = peer_settings(base, dataset)
    connect(settings)
    servers = bootstrap_servers(settings)  # broker and Ray are up before any clock starts
    ensure_topics(
        servers, topic_specs(settings.kafka.topics), max_message_bytes=settings.kafka.max_record_bytes
    )
    queries, qrels = load_queries(dataset), load_qrels(dataset)
    qids = [q for q in select(qrels, "heldout", n_queries, seed=0) if q in queries]
    texts = [queries[q] for q in qids]
    if not qids:
        raise ConfigError(f"{dataset}: no held-out question has both a text and qrels")
    embeddings: Any = None
    try:
        _say(f"riverbed: indexing {corpus} into {settings.index.name}")
        rb_index = index_riverbed(settings, corpus)
        _say(f"  {rb_index['chunks']} chunks in {rb_index['index_s']:.1f} s on {rb_index['device']}")
        _say("txtai: indexing the same corpus")
        config = txtai_config(resolve_model(settings.embed.model).location, rb_index["device"])
        embeddings, tx_index = index_txtai(config, corpus)
        _say(f"  {tx_index['rows']} passages in {tx_index['index_s']:.1f} s")
        embedder = Embedder(settings.embed.model_copy(update={"device": rb_index["device"]}))
        embedder.warm_up()
        with corpus.open(encoding="utf-8") as f:
            passages = [json.loads(line)["text"] for line in f if line.strip()]
        truncated = sum(n >= embedder.max_seq_length for n in embedder.count_tokens(passages))

        _say(f"queries: {len(texts)} held-out questions, k={k}, one at a time, then batched")
        searcher = Searcher(settings.serve.search, searchable(settings, RayShards(settings)))
        batch = settings.serve.search.embed_batch_size
        rb_raw, tx_raw = query_both(embedder, searcher, embeddings, texts, k, batch)
        _say("riverbed: in-process copies of the shards")
        local = in_process(settings, texts, k, ["vector"])["vector"]
    finally:
        if embeddings is not None:
            embeddings.close()
        drop_index(settings, [settings.kafka.topics.documents])

    rb = {**rb_index, **_measures(rb_raw, qids, qrels, k)}
    tx = {**tx_index, **_measures(tx_raw, qids, qrels, k)}
    keys = ["index_s", "index_warm_s", "p50_ms", "p99_ms", "batched_qps", f"recall@{k}", f"mrr@{k}"]
    ratios = {key: rb[key] / tx[key] if tx[key] else float("nan") for key in keys}
    local_ratios = {key: local[key] / tx[key] for key in ("p50_ms", "p99_ms", "batched_qps")}
    summary = (
        f"peer, {rb['documents']} passages, {len(qids)} questions: index {rb['index_s']:.1f} s vs txtai "
        f"{tx['index_s']:.1f} s ({ratios['index_s']:.2f}x; model loaded {ratios['index_warm_s']:.2f}x); "
        f"p50 {rb['p50_ms']:.1f} vs {tx['p50_ms']:.1f} ms ({ratios['p50_ms']:.2f}x); recall@{k} "
        f"{rb[f'recall@{k}']:.3f} vs {tx[f'recall@{k}']:.3f}; report in {out_dir}/peer.md"
    )
    result: dict[str, Any] = {
        "summary": summary,
        "machine": machine(),
        "versions": {
            p: _version(p)
            for p in ("txtai", "sentence-transformers", "transformers", "faiss-cpu", "faiss-gpu-cu12")
        },
        "dataset": str(dataset),
        "index": settings.index.name,
        "model": settings.embed.model,
        "device": rb_index["device"],
        "k": k,
        "queries": len(qids),
        "query_batch": batch,
        "txtai_config": config,
        "txtai_truncated_passages": truncated,
        "riverbed": rb,
        "riverbed_in_process_shards": local,
        "txtai": tx,
        "ratios": ratios,
        "ratios_in_process_shards": local_ratios,
    }
    write_peer_report(out_dir, result)
    return result


def _table(result: dict[str, Any]) -> list[list[str]]:
    k, batch = result["k"], result["query_batch"]
    rb, tx, r = result["riverbed"], result["txtai"], result["ratios"]
    spec = [
        ("index, corpus file → searchable (s)", "index_s", ".1f"),
        ("index, model loaded (s)", "index_warm_s", ".1f"),
        ("query p50, one at a time (ms)", "p50_ms", ".2f"),
        ("query p99, one at a time (ms)", "p99_ms", ".2f"),
        (f"batched, {batch} per call (q/s)", "batched_qps", ".0f"),
        (f"recall@{k} (per document)", f"recall@{k}", ".3f"),
        (f"MRR@{k}", f"mrr@{k}", ".3f"),
    ]
    rows = [[name, f"{rb[key]:{fmt}}", f"{tx[key]:{fmt}}", f"{r[key]:.2f}"] for name, key, fmt in spec]
    local, lr = result["riverbed_in_process_shards"], result["ratios_in_process_shards"]
    rows += [
        [f"{name}, Riverbed shards in process", f"{local[key]:{fmt}}", f"{tx[key]:{fmt}}", f"{lr[key]:.2f}"]
        for name, key, fmt in spec[2:5]
    ]
    return rows


def write_peer_report(out_dir: Path, result: dict[str, Any]) -> None:
    """``peer.json``, ``peer.md`` (measure | Riverbed | txtai | ratio) and ``peer.png``."""
    rb, tx, local, k = result["riverbed"], result["txtai"], result["riverbed_in_process_shards"], result["k"]
    steps = ", ".join(f"{step} {seconds:.1f}" for step, seconds in rb.get("start_steps_s", {}).items())
    preamble = (
        f"Riverbed vs txtai {result['versions']['txtai']}: {rb['documents']} passages of "
        f"{result['dataset']}, {result['queries']} held-out questions, k={k}, model {result['model']} "
        f"on {result['device']}. "
        f"Riverbed: {rb['chunks']} chunks; txtai: {tx['rows']} passages, "
        f"{result['txtai_truncated_passages']} truncated at the model's length. Both exact (flat) search. "
        "Ratio = Riverbed / txtai (times: lower is faster).\n\n"
        f"Riverbed index steps (s): read {rb['read_s']:.1f}, start actors, load model, join group "
        f"{rb['start_s']:.1f} ({steps}), produce {rb['produce_s']:.1f}, chunk + embed + write + commit "
        f"{rb['process_s']:.1f}. "
        f"txtai (s): read {tx['read_s']:.1f}, import {tx['import_s']:.1f}, load model {tx['load_s']:.1f}, "
        f"index {tx['index_warm_s']:.1f}; save to disk (not counted) {tx['save_s']:.1f}."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peer.json").write_text(json.dumps(result, indent=2, default=str))
    write_table(
        out_dir,
        "peer",
        ["measure", "Riverbed", "txtai", "ratio"],
        _table(result),
        preamble,
    )
    write_bars(
        out_dir,
        "peer",
        f"Riverbed vs txtai, {rb['documents']} passages, {result['queries']} questions",
        {
            "index (s)": {"Riverbed": rb["index_s"], "txtai": tx["index_s"]},
            "index, model loaded (s)": {"Riverbed": rb["index_warm_s"], "txtai": tx["index_warm_s"]},
            "query p50 (ms)": {
                "Riverbed": rb["p50_ms"],
                "Riverbed in-process": local["p50_ms"],
                "txtai": tx["p50_ms"],
            },
            "batched (q/s)": {"Riverbed": rb["batched_qps"], "txtai": tx["batched_qps"]},
            f"recall@{k}": {"Riverbed": rb[f"recall@{k}"], "txtai": tx[f"recall@{k}"]},
        },
    )
