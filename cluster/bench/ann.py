"""`riverbed bench ann`: recall@k against exact search, and speed, of every vector structure a
shard can use, on every backend named (``--backend faiss,milvus``), side by side on the same
vectors and queries.

# VECTORS: the dataset's passages chunked by the real chunker and embedded by the real Embedder
#   (normalised float32); cached as .npy under ``<cache_dir>/bench/ann``, keyed by the model and
#   a hash of the exact texts (a chunker or corpus change is a new key; the device is not part
#   of it: CPU and CUDA vectors of one model differ only by rounding). ``--synthetic N``: N random
#   unit vectors of the model's dim instead, and random unit queries: the structure-only figure
#   at a size no sample corpus reaches (no text structure, so the hardest case for ANN)
# QUERIES: the same seeded sample of questions as `bench query`, embedded the same way
# TRUTH: exact inner-product top-k of every query (``IndexFlatIP``, one batched call)
# SHARDS: one shard of each backend and structure, opened as a shard opens its store
#   (:func:`actors.backends.backend_for`), filled by its own writes of WRITE_BATCH chunks, then
#   snapshotted (Milvus Lite: flushed into indexed segments) and reopened once per search setting.
#   FAISS flat / ivf / hnsw and Milvus FLAT / IVF_FLAT / HNSW; IVF with ``nlist`` fitted to the
#   corpus (:func:`fit_nlist`, the same for both) and nprobe 1, 4, 16, 64; HNSW with each
#   backend's configured M and efConstruction and efSearch 16 to 256 (at least k). Milvus is
#   Milvus Lite in a scratch directory, or the server ``index.milvus.uri`` names (collections of
#   a throwaway index, dropped at the end)
# SPEED: through the shard's own ``search``, which returns hits with their text and metadata as
#   serving gets them: one query per call on 1 FAISS thread over the first SINGLE_QUERIES queries
#   (latency p50/p99, single QPS), then every query in calls of BATCH on all FAISS threads
#   (batched QPS); each the fastest of RUNS passes; recall comes from the batched calls

One shard holds the whole corpus; with ``index.n_shards`` shards each holds a part and the
searcher merges their top-k. ``--repeat`` must be 1: copies of the corpus are copies of its
vectors, exact ties that make "the" exact top-k, and so recall, ill-defined. For a larger
measurement pass a larger ``--dataset`` or ``--synthetic N``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from actors.backends import BACKENDS, ShardBackend
from actors.chunker import Chunker
from actors.embedder import Embedder, TextEmbedder
from actors.faiss_index import IVF_MIN_PER_LIST
from actors.vector_index import ChunkRecord
from cluster.bench.ingest import load_corpus
from cluster.bench.query import load_queries, percentile
from cluster.bench.report import machine, write_plot, write_table
from schemas.errors import ConfigError
from schemas.ids import chunk_id
from schemas.settings import FaissConfig, IndexConfig, MilvusConfig, Settings
from schemas.topology import shard_directory

NPROBES = (1, 4, 16, 64)
EF_SEARCHES = (16, 32, 64, 128, 256)
RUNS = 3  # passes per setting, the fastest kept: other processes share the cores
SINGLE_QUERIES = 200  # queries timed one per call (Milvus Lite answers one in tens of ms)
BATCH = 256  # queries per batched call (a Milvus search takes at most 16,384; replies stay small)
WRITE_BATCH = 2000  # chunks per shard write while filling
KINDS = ("flat", "ivf", "hnsw")
MILVUS_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Point:
    """One measured setting. ``param`` is nprobe (ivf), efSearch in force (hnsw), or None (flat)."""

    backend: str
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


Search = Callable[[np.ndarray], np.ndarray]  # queries -> row ids (n, k), -1 where short


def measure(search: Search, queries: np.ndarray, truth: np.ndarray, k: int, threads: int) -> dict[str, float]:
    """Recall and speed of ``search``, each speed from the fastest of :data:`RUNS` passes
    (latencies from the fastest single-query pass); leaves FAISS on ``threads``."""
    try:
        faiss.omp_set_num_threads(threads)
        search(queries[:8])  # warm-up: first calls allocate
        runs = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            ids = np.concatenate([search(queries[s : s + BATCH]) for s in range(0, len(queries), BATCH)])
            runs.append(time.perf_counter() - t0)
        faiss.omp_set_num_threads(1)
        passes = []
        for _ in range(RUNS):
            latencies = []
            for i in range(min(len(queries), SINGLE_QUERIES)):
                t0 = time.perf_counter()
                search(queries[i : i + 1])
                latencies.append(time.perf_counter() - t0)
            passes.append(latencies)
        latencies = min(passes, key=sum)
    finally:
        faiss.omp_set_num_threads(threads)
    return {
        "recall": recall_at_k(ids, truth, k),
        "single_qps": len(latencies) / sum(latencies),
        "batched_qps": len(queries) / min(runs),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def shard_config(
    index: IndexConfig, backend: str, kind: str, nlist: int | None, param: int | None
) -> IndexConfig:
    """``index`` set to one shard of ``backend`` with structure ``kind``, IVF lists ``nlist`` and the
    search setting ``param`` (nprobe or efSearch; None: as configured); FAISS threads left to the
    benchmark."""
    update: dict[str, Any] = {"ivf_nlist": nlist} if kind == "ivf" else {}
    if param is not None:  # None: the configured one
        update[{"ivf": "ivf_nprobe", "hnsw": "hnsw_ef_search"}[kind]] = param
    if backend == "faiss":
        faiss_config = index.faiss.model_copy(update={**update, "kind": kind, "omp_threads": None})
        return index.model_copy(update={"backend": backend, "faiss": faiss_config, "max_shard_bytes": None})
    milvus_config = index.milvus.model_copy(update={**update, "index_type": MILVUS_TYPES[kind]})
    return index.model_copy(update={"backend": backend, "milvus": milvus_config, "max_shard_bytes": None})


def settings_of(
    index: IndexConfig, backend: str, kind: str, nlist: int | None, k: int
) -> list[tuple[str, int | None]]:
    """``(label, param)`` of every search setting to measure for ``kind`` on ``backend``."""
    if kind == "flat":
        return [("exact", None)]
    own = _section(index, backend)
    if kind == "ivf":
        assert nlist is not None
        return [(f"nlist {nlist} nprobe {p}", p) for p in nprobes_for(nlist, own.ivf_nprobe)]
    return [(f"M {own.hnsw_m} ef {e}", e) for e in ef_searches_for(k, own.hnsw_ef_search)]


def _section(index: IndexConfig, backend: str) -> FaissConfig | MilvusConfig:
    """``backend``'s own settings (``index.faiss`` or ``index.milvus``: the same search knobs)."""
    section: FaissConfig | MilvusConfig = getattr(index, backend)
    return section


class ShardBench:
    """Shards of one backend in a scratch directory (Milvus by uri: a throwaway index's
    collections on that server), dropped on :meth:`close`."""

    def __init__(
        self, index: IndexConfig, backend: str, records: list[ChunkRecord], model: str, dim: int
    ) -> None:
        self.index, self.backend, self.records, self.model, self.dim = index, backend, records, model, dim
        base = (
            "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        )  # as a shard's disk, minus its fsync cost
        self._scratch = Path(tempfile.mkdtemp(prefix="riverbed-ann-", dir=base))
        self._name = f"bench-ann-{uuid.uuid4().hex[:8]}"
        self._made: list[tuple[IndexConfig, int]] = []
        self.row_of = {r.chunk_id: i for i, r in enumerate(records)}

    def build(self, config: IndexConfig, shard: int) -> float:
        """Fills shard ``shard`` (one per structure) with every record and snapshots it: seconds."""
        path = shard_directory(self._scratch, shard)
        self._made.append((config, shard))
        t0 = time.perf_counter()
        store = BACKENDS[self.backend].open(
            config, path, self.model, self.dim, index_name=self._name, shard=shard
        )
        try:
            for s in range(0, len(self.records), WRITE_BATCH):
                store.upsert(self.records[s : s + WRITE_BATCH])
            store.snapshot()
        finally:
            store.close()
        return time.perf_counter() - t0

    @contextmanager
    def opened(self, config: IndexConfig, shard: int, k: int) -> Iterator[Search]:
        """Shard ``shard`` reopened with ``config``'s search settings, as a search function."""
        path = shard_directory(self._scratch, shard)
        store: ShardBackend = BACKENDS[self.backend].open(
            config, path, self.model, self.dim, index_name=self._name, shard=shard
        )
        row_of = self.row_of

        def search(queries: np.ndarray) -> np.ndarray:
            out = np.full((len(queries), k), -1, dtype=np.int64)
            for i, hits in enumerate(store.search(queries, k)):
                out[i, : len(hits)] = [row_of[h.chunk_id] for h in hits[:k]]
            return out

        try:
            yield search
        finally:
            store.close()

    def close(self) -> None:
        backend = BACKENDS[self.backend]
        for config, shard in self._made:
            path = shard_directory(self._scratch, shard)
            backend.drop(config, path, index_name=self._name, shard=shard)
        shutil.rmtree(self._scratch, ignore_errors=True)


def sweep(
    index: IndexConfig,
    backends: Sequence[str],
    records: list[ChunkRecord],
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    threads: int,
    model: str,
) -> tuple[list[Point], dict[str, Any]]:
    """Every structure and search setting of every backend on ``vectors``: (points, what was
    chosen and why)."""
    kk = min(k, len(vectors))
    truth_index = faiss.IndexFlatIP(vectors.shape[1])
    truth_index.add(vectors)
    faiss.omp_set_num_threads(threads)
    _, truth = truth_index.search(queries, kk)
    nlist = fit_nlist(len(vectors), index.faiss.ivf_nlist)
    if nlist is None:
        _say(f"  ivf: skipped, {len(vectors)} vectors cannot train one list ({IVF_MIN_PER_LIST} needed)")
    points: list[Point] = []
    for backend in backends:
        bench = ShardBench(index, backend, records, model, vectors.shape[1])
        try:
            for shard, kind in enumerate(KINDS):
                if kind == "ivf" and nlist is None:
                    continue
                build_s = bench.build(shard_config(index, backend, kind, nlist, None), shard)
                _say(
                    f"  {backend} {kind}: {len(records):,} chunks written and snapshotted in {build_s:.1f} s"
                )
                for setting, param in settings_of(index, backend, kind, nlist, kk):
                    with bench.opened(shard_config(index, backend, kind, nlist, param), shard, kk) as search:
                        m = measure(search, queries, truth, kk, threads)
                    points.append(Point(backend, kind, setting, param, build_s=build_s, **m))
                    _say(
                        f"  {backend} {kind} {setting}: recall@{k} {m['recall']:.3f}, "
                        f"{m['single_qps']:,.0f} q/s single, {m['batched_qps']:,.0f} q/s batched, "
                        f"p50 {m['p50_ms']:.2f} ms"
                    )
        finally:
            bench.close()
    chosen = {
        "ivf_nlist": nlist,
        "ivf_nlist_configured": index.faiss.ivf_nlist,
        "configured": {
            backend: {
                "ivf_nprobe": min(own.ivf_nprobe, nlist) if nlist else None,
                "hnsw_m": own.hnsw_m,
                "hnsw_ef_construction": own.hnsw_ef_construction,
                "hnsw_ef_search": max(own.hnsw_ef_search, kk),
            }
            for backend, own in ((b, _section(index, b)) for b in backends)
        },
    }
    return points, chosen


def corpus_records(
    settings: Settings, dataset: Path, embedder: TextEmbedder, cache: Path
) -> tuple[list[ChunkRecord], int, bool]:
    """The chunk records of the dataset's corpus, as the pipeline writes them (vectors from the
    cache when it has them), the number of documents, and whether the vectors were cached."""
    corpus_path = dataset / "corpus.jsonl"
    docs = load_corpus(corpus_path, 1)
    chunker = Chunker(settings.chunk, settings.embed.model)
    chunks = [(d, c) for d, doc in zip(docs, chunker.chunk_batch(docs), strict=True) for c in doc.chunks]
    if not chunks:
        raise ConfigError(f"bench ann: {corpus_path} holds no text to index")
    _say(f"corpus: {len(docs):,} documents → {len(chunks):,} chunks")
    vectors, cached = embed_cached(embedder, [c.text for _, c in chunks], cache, "chunks")
    records = [
        ChunkRecord(c.chunk_id, d.id, c.number, c.text, d.title, c.start, c.end, d.metadata, v, c.alignment)
        for (d, c), v in zip(chunks, vectors, strict=True)
    ]
    return records, len(docs), cached


def bench_ann(
    settings: Settings,
    dataset: Path,
    repeat: int,
    n_queries: int,
    k: int,
    out_dir: Path,
    backends: Sequence[str] = ("faiss",),
    synthetic: int = 0,
) -> dict[str, Any]:
    if repeat != 1:
        raise ConfigError(
            f"bench ann: --repeat {repeat} would index identical vectors, ties that leave recall "
            "ill-defined; pass a larger --dataset or --synthetic N instead"
        )
    if k < 1 or n_queries < 1 or synthetic < 0:
        raise ConfigError(
            f"bench ann: --k and --queries must be at least 1 and --synthetic at least 0, got {k}, "
            f"{n_queries} and {synthetic}"
        )
    backends = list(backends)
    embedder = Embedder(settings.embed)
    cache = settings.cache_dir / "bench" / "ann"
    if synthetic:
        # VECTORS, QUERIES: random unit vectors of the model's dim
        embedder.warm_up()
        rng = np.random.default_rng(0)
        vectors = _unit(rng.standard_normal((synthetic, embedder.dim), dtype=np.float32))
        queries = _unit(rng.standard_normal((n_queries, embedder.dim), dtype=np.float32))
        records = [
            ChunkRecord(chunk_id(f"v{i}", 0), f"v{i}", 0, f"vector {i}", None, 0, 0, {}, vectors[i])
            for i in range(synthetic)
        ]
        n_docs, n_questions, cached, source = synthetic, n_queries, True, f"{synthetic:,} random unit vectors"
        _say(f"synthetic: {synthetic:,} random unit vectors, {n_queries} random unit queries")
    else:
        corpus_path = dataset / "corpus.jsonl"
        if not corpus_path.is_file() or not (dataset / "queries.jsonl").is_file():
            raise ConfigError(f"bench ann: {dataset} needs corpus.jsonl and queries.jsonl (BEIR layout)")
        # VECTORS
        records, n_docs, corpus_cached = corpus_records(settings, dataset, embedder, cache)
        vectors = np.stack([r.vector for r in records])
        # QUERIES
        questions = load_queries(dataset, n_queries)
        queries, queries_cached = embed_cached(embedder, questions, cache, "queries")
        n_questions, cached, source = len(questions), corpus_cached and queries_cached, f"`{dataset}`"

    # TRUTH, SHARDS, SPEED
    threads = settings.index.faiss.omp_threads or faiss.omp_get_max_threads()
    _say(f"sweep: {n_questions} queries, k={k}, batched on {threads} FAISS threads, single on 1")
    points, chosen = sweep(
        settings.index, backends, records, vectors, queries, k, threads, embedder.model_name
    )

    summary = _summary(points, chosen, backends, len(records), n_questions, k, out_dir)
    result = {
        "summary": summary,
        "machine": machine(),
        "dataset": "synthetic" if synthetic else str(dataset),
        "source": source,
        "backends": backends,
        "milvus": "server" if settings.index.milvus.uri else "lite",
        "documents": n_docs,
        "chunks": len(records),
        "queries": n_questions,
        "k": k,
        "model": embedder.model_name,
        "dim": int(vectors.shape[1]),
        "vectors_cached": cached,
        "faiss_threads_batched": threads,
        "runs": RUNS,
        "single_queries": min(n_questions, SINGLE_QUERIES),
        "batch": BATCH,
        **chosen,
        "results": [asdict(p) for p in points],
    }
    _report(out_dir, result, points)
    return result


def _unit(matrix: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def _summary(
    points: list[Point],
    chosen: dict[str, Any],
    backends: Sequence[str],
    chunks: int,
    queries: int,
    k: int,
    out: Path,
) -> str:
    def find(backend: str, kind: str, param: int | None) -> Point | None:
        return next((p for p in points if (p.backend, p.kind, p.param) == (backend, kind, param)), None)

    parts = []
    for backend in backends:
        configured = chosen["configured"][backend]
        for label, point in (
            ("flat", find(backend, "flat", None)),
            (f"ivf nprobe {configured['ivf_nprobe']}", find(backend, "ivf", configured["ivf_nprobe"])),
            (f"hnsw ef {configured['hnsw_ef_search']}", find(backend, "hnsw", configured["hnsw_ef_search"])),
        ):
            if point is not None:
                parts.append(f"{backend} {label} {point.recall:.3f} at {point.single_qps:,.0f} q/s")
    return (
        f"ann on {chunks:,} chunks, {queries:,} queries, recall@{k} at one query per call: "
        f"{'; '.join(parts)} (report in {out}/ann.md)"
    )


def _cells(p: Point) -> list[str]:
    return [
        p.backend,
        p.kind,
        p.setting,
        f"{p.recall:.3f}",
        f"{p.single_qps:,.0f}",
        f"{p.batched_qps:,.0f}",
        f"{p.p50_ms:.3f}",
        f"{p.p99_ms:.3f}",
        f"{p.build_s:.2f}",
    ]


def _report(out_dir: Path, result: dict[str, Any], points: list[Point]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ann.json").write_text(json.dumps(result, indent=2, default=str))
    k = result["k"]
    milvus = "a Milvus server" if result["milvus"] == "server" else "Milvus Lite embedded"
    preamble = (
        f"# Vector structures per backend: recall@{k} vs exact, and speed\n\n"
        f"{result['chunks']:,} chunks of {result['source']} ({result['model']}, {result['dim']}-d, inner "
        f"product), {result['queries']:,} queries, one shard per backend and structure (milvus: {milvus}), "
        f"searched through the shard's own `search` (hits with text and metadata). QPS single: one "
        f"query per call on 1 FAISS thread over the first {result['single_queries']} queries (p50/p99 "
        f"are its latencies); QPS batched: {result['batch']} queries per call on "
        f"{result['faiss_threads_batched']} threads. Each the fastest of {result['runs']} passes. IVF "
        f"nlist {result['ivf_nlist']} (configured {result['ivf_nlist_configured']}; FAISS trains at "
        f"most 1 list per {IVF_MIN_PER_LIST} vectors; Milvus Lite trains one IVF per segment). Build: "
        f"the shard's own writes of {WRITE_BATCH:,} chunks, then its snapshot, in seconds."
    )
    headers = [
        "backend",
        "kind",
        "setting",
        f"recall@{k}",
        "QPS single",
        "QPS batched",
        "p50 ms",
        "p99 ms",
        "build s",
    ]
    write_table(out_dir, "ann", headers, [_cells(p) for p in points], preamble)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for p in points:
        xs, ys = series.setdefault(f"{p.backend} {p.kind}", ([], []))
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
