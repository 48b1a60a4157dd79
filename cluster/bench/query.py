"""`riverbed bench query`: `/v1/search` over HTTP next to in-process encode + search, same run.

# INDEX: SQuAD v1.1 passages ingested ``--repeat`` times under different id prefixes through the
#   real pipeline (reused when a previous run built the same index)
# QUERIES: SQuAD questions, the same list for every measurement
# IN-PROCESS: the same model (Embedder) and copies of the same shards (FaissIndex) in this
#   process: one query at a time (latency), and batched encode + search (throughput)
# HTTP: the Serve app on the same shard actors, with an API key (as a deployment would run it);
#   1, 4, 16 and 64 concurrent clients, each sending its next query as soon as the previous answer
#   arrived (closed loop), from an aiohttp client in this process (its CPU a request is reported)
# MODES: vector, keyword and hybrid by default (``--mode`` names one), each measured in-process and
#   over HTTP on the same index
# EDGE: what answers HTTP (serve.edge: with the bench's key, ``auto`` is HAProxy; ``--set
#   serve.edge=proxy`` measures Serve's proxy; the local head restarts when it changes)
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.embedder import Embedder
from actors.index_shard import IndexShard, shard_directory
from cluster.bench.ingest import load_corpus
from cluster.bench.report import Series, machine, write_curves, write_report
from cluster.pipeline import ingest_documents
from cluster.serving import start_serving
from cluster.stats import index_stats
from deployments.searcher import LocalShards, Searcher
from schemas.settings import ApiKey, AuthConfig, Settings, load_settings

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


CLIENTS = (1, 4, 16, 64)
"""Concurrent closed-loop clients, one measurement each (16 is the one compared in-process)."""
MODES = ("vector", "keyword", "hybrid")
"""The search modes measured when ``--mode`` names none."""


def bench_settings(base: Settings, repeat: int, key: str | None = None) -> Settings:
    """A dedicated index and topic, so the bench never touches the user's index; ``key`` (read
    scope) as the app's only API key."""
    name = f"bench-query-x{repeat}"
    dump = base.model_dump(mode="json")
    dump["index"] = {**dump["index"], "name": name}
    dump["kafka"]["topics"] = {**dump["kafka"]["topics"], "documents": f"bench.{name}.documents"}
    dump["serve"] = {**dump["serve"], "ingest": False}
    settings = load_settings(overrides=dump)
    if key is None:
        return settings
    auth = AuthConfig(keys=[ApiKey(key=key, scopes=["read"], name=name)])
    return settings.model_copy(update={"serve": settings.serve.model_copy(update={"auth": auth})})


def build_index(settings: Settings, corpus: Path, repeat: int) -> dict[str, Any]:
    """Ingests the corpus copies unless the index already holds them all."""
    docs = load_corpus(corpus, repeat)
    stats = index_stats(settings, broker=False)
    if stats["documents"] >= len(docs):
        _say(f"index {settings.index.name}: {stats['chunks']} chunks already ingested")
        return stats
    _say(f"building index {settings.index.name} once (later runs reuse it)")
    ingest_documents(settings, docs)
    return index_stats(settings, broker=False)


def load_queries(dataset: Path, n: int) -> list[str]:
    queries = []
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            queries.append(json.loads(line)["text"])
    rng = np.random.default_rng(0)
    return [queries[i] for i in rng.permutation(len(queries))[:n]]


def in_process(settings: Settings, queries: list[str], k: int, modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per mode: latency of one query at a time and throughput of batched encode + search, in
    this process, on copies of the shards (the live ones are locked by their actors)."""
    embedder = Embedder(settings.embed)
    embedder.warm_up()
    with tempfile.TemporaryDirectory(prefix="riverbed-bench-") as tmp:
        shards = []
        for i in range(settings.index.n_shards):
            source = shard_directory(settings.data_dir, i)
            shutil.copytree(source, shard_directory(Path(tmp), i), ignore=shutil.ignore_patterns("LOCK"))
            faiss = settings.index.faiss.model_copy(update={"omp_threads": 1})
            shard = IndexShard(
                settings.index.model_copy(update={"faiss": faiss}),
                Path(tmp),
                i,
                embedder.model_name,
                embedder.dim,
            )
            shard.warm_up()
            shards.append(shard)
        searcher = Searcher(settings.serve.search, LocalShards(shards))
        embedder.embed(queries[:8])
        measured = {mode: _in_process_mode(embedder, searcher, settings, queries, k, mode) for mode in modes}
        for shard in shards:
            shard.close()
    return measured


def _in_process_mode(
    embedder: Embedder, searcher: Searcher, settings: Settings, queries: list[str], k: int, mode: str
) -> dict[str, Any]:
    """One mode's in-process figures (keyword queries are not embedded, as the app does)."""
    embeds = mode != "keyword"

    async def one(q: str, v: np.ndarray | None) -> None:
        await searcher.search(q, v, k, None, mode)

    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        v = embedder.embed([q])[0] if embeds else None
        asyncio.run(one(q, v))
        latencies.append(time.perf_counter() - t0)

    batch = settings.serve.search.embed_batch_size
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        part = queries[start : start + batch]
        vectors: list[np.ndarray | None] = list(embedder.embed(part)) if embeds else [None] * len(part)

        async def many(part: list[str] = part, vectors: list[np.ndarray | None] = vectors) -> None:
            await asyncio.gather(
                *(searcher.search(q, v, k, None, mode) for q, v in zip(part, vectors, strict=True))
            )

        asyncio.run(many())
    batched_s = time.perf_counter() - t0
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "single_qps": len(queries) / sum(latencies),
        "batched_qps": len(queries) / batched_s,
    }


async def _http_level(
    url: str, queries: list[str], k: int, mode: str, clients: int, key: str
) -> dict[str, Any]:
    """One closed-loop level. The client is aiohttp's: on the same cores as the server, httpx's
    client took about 13 times its CPU a request (3.9 against 0.3 ms on 2 slow cores), so a
    heavier client would measure itself. ``client_cpu_ms`` is this process's CPU a request (every
    thread's, Ray's included: an upper bound of the client's). A request that times out or fails
    to connect is an error, as a non-200 answer is."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    position = 0
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout, headers=headers) as client:

        async def search(q: str) -> int:
            try:
                async with client.post("/v1/search", json={"query": q, "k": k, "mode": mode}) as r:
                    await r.read()  # the whole answer, as a client that uses it would
                    return r.status
            except (TimeoutError, aiohttp.ClientError):
                return 0

        for q in queries[:4]:  # warm a connection and the replicas
            await search(q)

        async def worker() -> None:
            nonlocal position, errors
            while position < len(queries):
                q = queries[position]
                position += 1
                t0 = time.perf_counter()
                status = await search(q)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return level_summary(clients, latencies, errors, elapsed, cpu)


def level_summary(
    clients: int, latencies: list[float], errors: int, elapsed_s: float, cpu_s: float
) -> dict[str, Any]:
    """One closed-loop level's figures: requests, errors, p50/p99 (ms), requests per second over
    ``elapsed_s``, and ``cpu_s`` (the client process's) per request in ms."""
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "qps": len(latencies) / elapsed_s,
        "client_cpu_ms": cpu_s / max(1, len(latencies)) * 1000,
    }


def bench_query(
    base: Settings, dataset: Path, repeat: int, n_queries: int, k: int, mode: str | None, out_dir: Path
) -> dict[str, Any]:
    """In-process and HTTP figures for each search mode (``mode``, or :data:`MODES`)."""
    key = secrets.token_urlsafe(32)
    settings = bench_settings(base, repeat, key)
    modes = [mode] if mode else list(MODES)
    stats = build_index(settings, dataset / "corpus.jsonl", repeat)
    queries = load_queries(dataset, n_queries)

    _say(f"in-process: {len(queries)} queries, modes {', '.join(modes)}, k={k}")
    local = in_process(settings, queries, k, modes)

    edge = settings.serve.data_plane()
    _say(f"HTTP: starting the app (edge: {edge})")
    serving = start_serving(settings, ingest=False)
    http: dict[str, list[dict[str, Any]]] = {}
    try:
        for m in modes:
            http[m] = []
            for clients in CLIENTS:
                level = asyncio.run(_http_level(serving.url, queries, k, m, clients, key))
                _say(
                    f"  {m:7s} {clients:2d} clients: p50 {level['p50_ms']:.1f} ms  "
                    f"p99 {level['p99_ms']:.1f} ms  {level['qps']:.0f} q/s  {level['errors']} errors"
                )
                http[m].append(level)
    finally:
        serving.stop()

    per_mode = {}
    for m in modes:
        one, sixteen = http[m][0], next(lv for lv in http[m] if lv["clients"] == 16)
        per_mode[m] = {
            "in_process": local[m],
            "http": http[m],
            "overhead_p50_ms_1_client": one["p50_ms"] - local[m]["p50_ms"],
            "throughput_ratio_16_vs_in_process_batched": sixteen["qps"] / local[m]["batched_qps"],
        }
    result = {
        "machine": machine(),
        "index": settings.index.name,
        "chunks": stats["chunks"],
        "queries": len(queries),
        "k": k,
        "edge": edge,
        "modes": per_mode,
    }
    report(out_dir, result)
    return result


def report(out_dir: Path, result: dict[str, Any]) -> None:
    """Writes ``query.{json,md,png}`` of a ``result`` (also to redraw a saved one)."""
    per_mode, k, edge = result["modes"], result["k"], result["edge"]
    rows = [
        ("chunks indexed", str(result["chunks"])),
        ("queries", f"{result['queries']} SQuAD questions, k {k}"),
        ("edge (serve.edge)", edge),
    ]
    for m, figures in per_mode.items():
        lp = figures["in_process"]
        rows += [
            (f"{m}: in-process p50 / p99 (one at a time)", f"{lp['p50_ms']:.1f} / {lp['p99_ms']:.1f} ms"),
            (f"{m}: in-process batched throughput", f"{lp['batched_qps']:.0f} q/s"),
            *(
                (
                    f"{m}: HTTP {lv['clients']} clients p50 / p99",
                    f"{lv['p50_ms']:.1f} / {lv['p99_ms']:.1f} ms, {lv['qps']:.0f} q/s, {lv['errors']} errors"
                    + (
                        f", client CPU {lv['client_cpu_ms']:.2f} ms a request"
                        if "client_cpu_ms" in lv
                        else ""
                    ),
                )
                for lv in figures["http"]
            ),
            (f"{m}: HTTP + Serve overhead at p50, 1 client", f"{figures['overhead_p50_ms_1_client']:.1f} ms"),
            (
                f"{m}: HTTP 16 clients / in-process batched",
                f"{figures['throughput_ratio_16_vs_in_process_batched']:.2f}x",
            ),
        ]
    write_report(out_dir, "query", result, rows)
    latency: Series = {}
    throughput: Series = {}
    for m, figures in per_mode.items():
        clients = [float(lv["clients"]) for lv in figures["http"]]
        latency[m] = (clients, [lv["p50_ms"] for lv in figures["http"]])
        throughput[m] = (clients, [lv["qps"] for lv in figures["http"]])
    write_curves(
        out_dir,
        "query",
        title=f"/v1/search over HTTP (k={k}, edge {edge}, {result['chunks']} chunks); dotted: in-process",
        panels={"p50 (ms)": latency, "queries/s": throughput},
        hlines={
            "p50 (ms)": {m: f["in_process"]["p50_ms"] for m, f in per_mode.items()},
            "queries/s": {m: f["in_process"]["batched_qps"] for m, f in per_mode.items()},
        },
        xlabel="concurrent clients",
        log_axes=True,
    )
