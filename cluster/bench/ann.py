"""`riverbed bench ann`: recall@k against exact search, and speed, of the FAISS structures a shard
can use (``index.faiss.kind``: flat, ivf, hnsw), side by side on the same vectors and queries.

# VECTORS: the dataset's passages chunked by the real chunker and embedded by the real Embedder
#   (normalised float32); cached as .npy under ``<cache_dir>/bench/ann``, keyed by the model and
#   a hash of the exact texts (a chunker or corpus change is a new key; the device is not part
#   of it: CPU and CUDA vectors of one model differ only by rounding)
# QUERIES: the same seeded sample of questions as `bench query`, embedded the same way
# TRUTH: exact inner-product top-k of every query (``IndexFlatIP``, one batched call)
# STRUCTURES: built by :func:`actors.faiss_index.build_structure`, the function a shard builds
#   its own with, searched with the parameters a shard passes (``efSearch`` at least k):
#   flat; IVF with ``nlist`` fitted to the corpus (:func:`fit_nlist`) and nprobe 1, 4, 16, 64;
#   HNSW with the configured M and efConstruction and efSearch 16 to 256
# SPEED: one query per call on 1 FAISS thread (latency p50/p99, single QPS), then every query in
#   one call on all FAISS threads (batched QPS); each the fastest of 3 passes; recall comes from
#   the batched call

One structure holds the whole corpus, as a single shard would; with ``index.n_shards`` shards each
holds a part and the searcher merges their top-k. ``--repeat`` must be 1: copies of the corpus are
copies of its vectors, exact ties that make "the" exact top-k, and so recall, ill-defined. For a
larger measurement pass a larger ``--dataset``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from actors.chunker import Chunker
from actors.embedder import Embedder, TextEmbedder
from actors.faiss_index import IVF_MIN_PER_LIST, build_structure
from cluster.bench.ingest import load_corpus
from cluster.bench.query import load_queries, percentile
from cluster.bench.report import machine, write_plot, write_table
from schemas.errors import ConfigError
from schemas.settings import FaissConfig, Settings

_faiss: Any = faiss  # faiss-cpu's bundled stubs lack the SearchParameters classes and their arguments

NPROBES = (1, 4, 16, 64)
EF_SEARCHES = (16, 32, 64, 128, 256)
RUNS = 3  # passes per setting, the fastest kept: other processes share the cores


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Point:
    """One measured setting. ``param`` is nprobe (ivf), efSearch in force (hnsw), or None (flat)."""

    kind: str
    setting: str
    param: int | None
    recall: float
    single_qps: float
    batched_qps: float
    p50_ms: float
    p99_ms: float
    build_s: float


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over rows of ``|approx[:k] ∩ exact[:k]| / k`` (id arrays ``(n, >= k)``; id -1, FAISS's
    filler for a short result, never counts). ``k`` should be ``min(k, corpus size)``."""
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} result rows for {exact.shape[0]} queries")
    if k <= 0 or len(exact) == 0:
        raise ValueError(f"recall needs k >= 1 and queries, got k={k}, {len(exact)} queries")
    hits = sum(
        len((set(a[:k].tolist()) - {-1}) & set(e[:k].tolist())) for a, e in zip(approx, exact, strict=True)
    )
    return hits / (k * len(exact))


def fit_nlist(n_vectors: int, configured: int) -> int | None:
    """The IVF list count to measure: ``configured`` when the corpus can train it (FAISS asks for
    ``IVF_MIN_PER_LIST`` points per centroid; a shard below that stays flat), else the largest
    power of two it can train. None when it cannot train even one list."""
    most = n_vectors // IVF_MIN_PER_LIST
    if most < 1:
        return None
    return configured if configured <= most else 1 << (most.bit_length() - 1)


def nprobes_for(nlist: int, configured: int) -> list[int]:
    """:data:`NPROBES` and the configured nprobe, each capped at ``nlist`` (more probes than lists
    is all of them), ascending, without repeats."""
    return sorted({min(p, nlist) for p in (*NPROBES, configured)})


def ef_searches_for(k: int, configured: int) -> list[int]:
    """:data:`EF_SEARCHES` and the configured efSearch as a shard applies them: at least ``k``."""
    return sorted({max(ef, k) for ef in (*EF_SEARCHES, configured)})


def embed_cached(
    embedder: TextEmbedder, texts: Sequence[str], directory: Path, label: str
) -> tuple[np.ndarray, bool]:
    """``(vectors, came from the cache)`` of ``texts``: loaded from ``directory`` when an earlier
    run embedded exactly these texts with this model, else embedded and saved (atomically)."""
    digest = hashlib.blake2b(embedder.model_name.encode(), digest_size=16)
    for text in texts:
        digest.update(b"\0" + text.encode())
    path = directory / f"{label}-{digest.hexdigest()}.npy"
    if path.exists():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            return vectors, True
    _say(f"embedding {len(texts):,} {label} with {embedder.model_name} (cached for later runs)")
    embedder.warm_up()  # idempotent; loading the model is not part of the rate below
    t0 = time.perf_counter()
    vectors = np.ascontiguousarray(embedder.embed(list(texts)), dtype=np.float32)
    _say(f"  {len(texts) / (time.perf_counter() - t0):.0f} {label}/s")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
    return vectors, False


def measure(
    index: Any, params: Any, queries: np.ndarray, truth: np.ndarray, k: int, threads: int
) -> dict[str, float]:
    """Recall and speed of ``index.search(..., params=params)``, each speed from the fastest of
    :data:`RUNS` passes (latencies from the fastest single-query pass); leaves FAISS on ``threads``."""
    try:
        faiss.omp_set_num_threads(threads)
        index.search(queries[:8], k, params=params)  # warm-up: first calls allocate
        runs = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            _, ids = index.search(queries, k, params=params)
            runs.append(time.perf_counter() - t0)
        faiss.omp_set_num_threads(1)
        passes = []
        for _ in range(RUNS):
            latencies = []
            for i in range(len(queries)):
                t0 = time.perf_counter()
                index.search(queries[i : i + 1], k, params=params)
                latencies.append(time.perf_counter() - t0)
            passes.append(latencies)
        latencies = min(passes, key=sum)
    finally:
        faiss.omp_set_num_threads(threads)
    return {
        "recall": recall_at_k(ids, truth, k),
        "single_qps": len(queries) / sum(latencies),
        "batched_qps": len(queries) / min(runs),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def _build(config: FaissConfig, vectors: np.ndarray) -> tuple[Any, float]:
    t0 = time.perf_counter()
    index = build_structure(config, vectors.shape[1], vectors)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index, time.perf_counter() - t0


def sweep(
    config: FaissConfig, vectors: np.ndarray, queries: np.ndarray, k: int, threads: int
) -> tuple[list[Point], dict[str, Any]]:
    """Every setting of flat, IVF and HNSW on ``vectors``: (points, what was chosen and why)."""
    kk = min(k, len(vectors))
    truth_index = faiss.IndexFlatIP(vectors.shape[1])
    truth_index.add(vectors)
    faiss.omp_set_num_threads(threads)
    _, truth = truth_index.search(queries, kk)
    points: list[Point] = []

    def run(kind: str, setting: str, param: int | None, index: Any, params: Any, build_s: float) -> None:
        m = measure(index, params, queries, truth, kk, threads)
        points.append(Point(kind, setting, param, build_s=build_s, **m))
        _say(
            f"  {kind} {setting}: recall@{k} {m['recall']:.3f}, {m['single_qps']:,.0f} q/s single, "
            f"{m['batched_qps']:,.0f} q/s batched, p50 {m['p50_ms']:.2f} ms"
        )

    # FLAT
    flat, build_s = _build(config.model_copy(update={"kind": "flat"}), vectors)
    run("flat", "exact", None, flat, None, build_s)

    # IVF
    nlist = fit_nlist(len(vectors), config.ivf_nlist)
    if nlist is None:
        _say(f"  ivf: skipped, {len(vectors)} vectors cannot train one list ({IVF_MIN_PER_LIST} needed)")
    else:
        ivf_config = config.model_copy(update={"kind": "ivf", "ivf_nlist": nlist})
        ivf, build_s = _build(ivf_config, vectors)
        if not isinstance(ivf, faiss.IndexIVFFlat):  # build_structure fell back to flat
            raise ConfigError(f"bench ann: nlist {nlist} did not train on {len(vectors)} vectors")
        for nprobe in nprobes_for(nlist, config.ivf_nprobe):
            params = _faiss.SearchParametersIVF(nprobe=nprobe)
            run("ivf", f"nlist {nlist} nprobe {nprobe}", nprobe, ivf, params, build_s)

    # HNSW
    hnsw, build_s = _build(config.model_copy(update={"kind": "hnsw"}), vectors)
    for ef in ef_searches_for(kk, config.hnsw_ef_search):
        params = _faiss.SearchParametersHNSW(efSearch=ef)
        run("hnsw", f"M {config.hnsw_m} ef {ef}", ef, hnsw, params, build_s)

    chosen = {
        "ivf_nlist": nlist,
        "ivf_nlist_configured": config.ivf_nlist,
        "ivf_nprobe_configured": min(config.ivf_nprobe, nlist) if nlist else None,
        "hnsw_m": config.hnsw_m,
        "hnsw_ef_construction": config.hnsw_ef_construction,
        "hnsw_ef_search_configured": max(config.hnsw_ef_search, kk),
    }
    return points, chosen


def bench_ann(
    settings: Settings, dataset: Path, repeat: int, n_queries: int, k: int, out_dir: Path
) -> dict[str, Any]:
    if repeat != 1:
        raise ConfigError(
            f"bench ann: --repeat {repeat} would index identical vectors, ties that leave recall "
            "ill-defined; pass a larger --dataset instead"
        )
    if k < 1 or n_queries < 1:
        raise ConfigError(f"bench ann: --k and --queries must be at least 1, got {k} and {n_queries}")
    corpus_path = dataset / "corpus.jsonl"
    if not corpus_path.is_file() or not (dataset / "queries.jsonl").is_file():
        raise ConfigError(f"bench ann: {dataset} needs corpus.jsonl and queries.jsonl (BEIR layout)")

    # VECTORS
    docs = load_corpus(corpus_path, 1)
    chunker = Chunker(settings.chunk, settings.embed.model)
    texts = [c.text for doc in chunker.chunk_batch(docs) for c in doc.chunks]
    if not texts:
        raise ConfigError(f"bench ann: {corpus_path} holds no text to index")
    _say(f"corpus: {len(docs):,} documents → {len(texts):,} chunks")
    embedder = Embedder(settings.embed)
    cache = settings.cache_dir / "bench" / "ann"
    vectors, corpus_cached = embed_cached(embedder, texts, cache, "chunks")

    # QUERIES
    questions = load_queries(dataset, n_queries)
    queries, queries_cached = embed_cached(embedder, questions, cache, "queries")

    # TRUTH, STRUCTURES, SPEED
    threads = settings.index.faiss.omp_threads or faiss.omp_get_max_threads()
    _say(f"sweep: {len(questions)} queries, k={k}, batched on {threads} FAISS threads, single on 1")
    points, chosen = sweep(settings.index.faiss, vectors, queries, k, threads)

    summary = _summary(points, chosen, len(texts), len(questions), k, out_dir)
    result = {
        "summary": summary,
        "machine": machine(),
        "dataset": str(dataset),
        "documents": len(docs),
        "chunks": len(texts),
        "queries": len(questions),
        "k": k,
        "model": embedder.model_name,
        "dim": int(vectors.shape[1]),
        "vectors_cached": corpus_cached and queries_cached,
        "faiss_threads_batched": threads,
        "runs": RUNS,
        **chosen,
        "results": [asdict(p) for p in points],
    }
    _report(out_dir, result, points)
    return result


def _summary(
    points: list[Point], chosen: dict[str, Any], chunks: int, queries: int, k: int, out: Path
) -> str:
    def find(kind: str, param: int | None) -> Point | None:
        return next((p for p in points if p.kind == kind and p.param == param), None)

    parts = []
    for label, point in (
        ("flat", find("flat", None)),
        (f"ivf nlist {chosen['ivf_nlist']} nprobe {chosen['ivf_nprobe_configured']}",
         find("ivf", chosen["ivf_nprobe_configured"])),
        (f"hnsw ef {chosen['hnsw_ef_search_configured']}", find("hnsw", chosen["hnsw_ef_search_configured"])),
    ):  # fmt: skip
        if point is not None:
            parts.append(f"{label} {point.recall:.3f} recall@{k} at {point.single_qps:,.0f} q/s")
    return (
        f"ann on {chunks:,} chunks, {queries:,} queries (one per call, 1 thread): "
        f"{'; '.join(parts)} (report in {out}/ann.md)"
    )


def _cells(p: Point) -> list[str]:
    return [
        p.kind,
        p.setting,
        f"{p.recall:.3f}",
        f"{p.single_qps:,.0f}",
        f"{p.batched_qps:,.0f}",
        f"{p.p50_ms:.3f}",
        f"{p.p99_ms:.3f}",
        f"{p.build_s:.3f}",
    ]


def _report(out_dir: Path, result: dict[str, Any], points: list[Point]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ann.json").write_text(json.dumps(result, indent=2, default=str))
    k = result["k"]
    preamble = (
        f"# FAISS structures: recall@{k} vs exact, and speed\n\n"
        f"{result['chunks']:,} chunks of `{result['dataset']}` ({result['model']}, {result['dim']}-d, "
        f"inner product), {result['queries']:,} questions. QPS single: one query per call on 1 FAISS "
        f"thread (p50/p99 are its latencies); QPS batched: all queries in one call on "
        f"{result['faiss_threads_batched']} threads. Each the fastest of {result['runs']} passes. IVF nlist "
        f"{result['ivf_nlist']} (configured {result['ivf_nlist_configured']}; FAISS trains at most "
        f"1 list per {IVF_MIN_PER_LIST} vectors). Build: train + add, seconds."
    )
    headers = ["kind", "setting", f"recall@{k}", "QPS single", "QPS batched", "p50 ms", "p99 ms", "build s"]
    write_table(out_dir, "ann", headers, [_cells(p) for p in points], preamble)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for p in points:
        label = {"ivf": f"ivf nlist {result['ivf_nlist']}", "hnsw": f"hnsw M {result['hnsw_m']}"}.get(
            p.kind, p.kind
        )
        xs, ys = series.setdefault(label, ([], []))
        xs.append(p.recall)
        ys.append(p.single_qps)
    write_plot(
        out_dir,
        "ann",
        title=f"recall@{k} vs single-query QPS, {result['chunks']:,} chunks",
        series=series,
        xlabel=f"recall@{k} vs exact",
        ylabel="queries/s (1 per call, 1 thread)",
        ylog=True,
    )
