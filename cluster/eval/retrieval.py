"""`riverbed eval retrieval`: recall, MRR and nDCG of each search mode on a BEIR-layout dataset.

# INDEX: the corpus through the real pipeline (Kafka → chunk → embed → shards) into a fresh index,
#   or an existing one (``--index``)
# QUERIES: the split (tune: even stable_hash of the query id; heldout: odd; all), optionally sampled
# SEARCH: the Retriever's code (Searcher over the shard actors), queries embedded in batches
# SCORE: per document (chunks collapse to their document's best rank), against the qrels
# GRAPH (graph mode): its size and how well it links each question's relevant passages
#   (cluster.eval.graph_quality), read from the graph shards' stores
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import random
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from actors.embedder import Embedder
from actors.graph_extract import pipeline_stop_words
from actors.reranker import Reranker
from cluster.bench.report import machine, write_report
from cluster.eval.graph_quality import linkage
from cluster.eval.metrics import documents_in_order, score_run
from cluster.graph_files import graph_stats, read_graph
from cluster.pipeline import ingest_documents, open_graph_shards, release_shards, shard_handles
from cluster.producer import read_records
from cluster.ray_runtime import connect
from cluster.serving import recorded_model
from deployments.graph import GraphReader
from deployments.retriever import RayShards
from deployments.searcher import Searcher
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError
from schemas.ids import in_tune_split
from schemas.settings import Settings, load_settings

log = logging.getLogger(__name__)

MODES = ("vector", "keyword", "hybrid")
"""``--mode all``; with graph.enabled (or ``--mode graph``) the graph mode too, its graph built by the
evaluation's ingest."""
CHUNKS_PER_QUERY = 60  # enough chunks that 20 distinct documents remain after collapsing


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_queries(dataset: Path) -> dict[str, str]:
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {str(r.get("_id", r.get("id"))): r["text"] for r in rows}


def load_query_types(dataset: Path) -> dict[str, str]:
    """``{query id: type}`` for the queries that give one (HotpotQA: bridge, comparison)."""
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {str(r.get("_id", r.get("id"))): str(r["type"]) for r in rows if r.get("type")}


def load_qrels(dataset: Path, name: str = "qrels.tsv") -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with (dataset / name).open(encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def select(qrels: dict[str, dict[str, int]], split: str, sample: int | None, seed: int) -> list[str]:
    ids = sorted(q for q in qrels if split == "all" or in_tune_split(q) == (split == "tune"))
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(seed).sample(ids, sample))
    return ids


def report_name(kind: str, dataset: Path, corpus: Path | None, split: str) -> str:
    """``<kind>-<dataset>[-on-<corpus>]-<split>``; a dataset named by a language code alone
    (``xquad/de``) keeps its parent's name (``xquad-de``)."""

    def label(path: Path) -> str:
        path = path.resolve()
        return f"{path.parent.name}-{path.name}" if len(path.name) <= 3 else path.name

    on = f"-on-{label(corpus)}" if corpus is not None and corpus.resolve() != dataset.resolve() else ""
    return f"{kind}-{label(dataset)}{on}-{split}"


def eval_settings(base: Settings, dataset: Path, index: str | None) -> Settings:
    slug = re.sub(r"[^a-z0-9_-]+", "-", dataset.name.lower())[:20].strip("-_") or "data"
    name = index or f"eval-{slug}-{uuid.uuid4().hex[:6]}"
    dump = base.model_dump(mode="json")
    dump["index"] = {**dump["index"], "name": name}
    dump["kafka"]["topics"] = {**dump["kafka"]["topics"], "documents": f"eval.{name}.documents"}
    return load_settings(overrides=dump)


def open_index(settings: Settings, corpus: Path | None) -> float:
    """Connects to Ray, ingests ``corpus`` into the (fresh) index when given, and starts the
    index's shard actors (and its graph's, with graph.enabled); returns the seconds it took.
    ConfigError when the index holds no data, or no graph that graph.enabled asks for."""
    connect(settings)
    t0 = time.monotonic()
    if corpus is not None:
        build_index(settings, corpus)
    recorded = recorded_model(settings)
    if recorded is None:
        raise ConfigError(f"index {settings.index.name!r} holds no data under {settings.data_dir}")
    shard_handles(settings, *recorded)
    if settings.graph.enabled and not open_graph_shards(settings):
        raise ConfigError(
            f"index {settings.index.name!r} has no knowledge graph under {settings.graph_side().data_dir}: "
            "build it by ingesting with graph.enabled, or evaluate without graph mode"
        )
    return time.monotonic() - t0


def build_index(settings: Settings, corpus: Path) -> None:
    ingest_documents(
        settings, [r.envelope for r in read_records(corpus) if isinstance(r.envelope, DocumentEnvelope)]
    )


def eval_reranker(settings: Settings) -> Reranker | None:
    """The reranker the app would use (``serve.search.rerank``), loaded, or None."""
    if not settings.serve.search.rerank:
        return None
    reranker = Reranker(settings.serve.search, settings.cache_dir, settings.finetune)
    reranker.warm_up()
    _say(f"reranking the top {settings.serve.search.rerank_candidates} with {reranker.location}")
    return reranker


def eval_retrieval(
    base: Settings,
    dataset: Path,
    *,
    corpus: Path | None = None,
    split: str = "heldout",
    sample: int | None = None,
    seed: int = 0,
    modes: tuple[str, ...] = MODES,
    index: str | None = None,
    out_dir: Path = Path("out/eval"),
) -> dict[str, Any]:
    for name in ("queries.jsonl", "qrels.tsv"):
        if not (dataset / name).is_file():
            raise ConfigError(
                f"{dataset / name} not found: --dataset needs BEIR layout (corpus, queries, qrels)"
            )
    corpus_file = (corpus or dataset) / "corpus.jsonl"
    if not corpus_file.is_file():
        raise ConfigError(f"{corpus_file} not found")
    if "graph" in modes and not base.graph.enabled:
        base = load_settings(
            overrides={
                **base.model_dump(mode="json"),
                "graph": {**base.graph.model_dump(mode="json"), "enabled": True},
            }
        )
    settings = eval_settings(base, dataset, index)
    ingest_s = open_index(settings, corpus_file if index is None else None)

    try:
        # QUERIES
        queries, qrels = load_queries(dataset), load_qrels(dataset)
        chosen = [q for q in select(qrels, split, sample, seed) if q in queries]
        texts = [queries[q] for q in chosen]
        embedder = Embedder(settings.embed)
        vectors = embedder.embed(texts)

        # SEARCH and SCORE
        graph = (
            GraphReader(RayShards(settings.graph_side()), pipeline_stop_words(settings.graph.model))
            if "graph" in modes
            else None
        )  # as the app's Retriever links questions
        reranker = eval_reranker(settings)
        searcher = Searcher(settings.serve.search, RayShards(settings), graph=graph, reranker=reranker)
        results: dict[str, Any] = {}
        for mode in modes:
            runs: dict[str, list[str]] = {}
            start = time.monotonic()
            for lo in range(0, len(chosen), 64):
                batch = slice(lo, lo + 64)
                ranked = asyncio.run(
                    searcher.search_many(texts[batch], vectors[batch], CHUNKS_PER_QUERY, None, mode)
                )
                for qid, hits in zip(chosen[batch], ranked, strict=True):
                    runs[qid] = documents_in_order(r.hit.document_id for r in hits)[:20]
            results[mode] = {
                **score_run(runs, {q: qrels[q] for q in chosen}),
                "seconds": time.monotonic() - start,
            }
            r = results[mode]
            _say(
                f"{mode:8s} recall@1 {r['recall@1']:.3f}  @5 {r['recall@5']:.3f}  @10 {r['recall@10']:.3f}  "
                f"@20 {r['recall@20']:.3f}  MRR@10 {r['mrr@10']:.3f}  nDCG@10 {r['ndcg@10']:.3f}  "
                f"all@2 {r['all@2']:.3f}  @5 {r['all@5']:.3f}  @10 {r['all@10']:.3f}"
            )
        graph_report = _graph_report(settings, dataset, {q: qrels[q] for q in chosen}) if graph else None
    finally:
        if index is None:  # a fresh index: its shard actors go (`--index NAME` reopens it)
            release_shards(settings)
            release_shards(settings.graph_side())

    report = {
        "machine": machine(),
        "dataset": str(dataset),
        "corpus": str(corpus_file),
        "split": split,
        "sample": sample,
        "seed": seed,
        "queries": len(chosen),
        "index": settings.index.name,
        "ingest_s": round(ingest_s, 1),
        "model": settings.embed.model,
        "rerank": (
            {
                "model": reranker.model_name,
                "location": reranker.location,
                "candidates": settings.serve.search.rerank_candidates,
            }
            if reranker is not None
            else None
        ),
        "modes": results,
    }
    if graph_report is not None:
        report["graph"] = graph_report
    rows = [
        (
            mode,
            " / ".join(
                f"{r[m]:.3f}"
                for m in (
                    "recall@1",
                    "recall@5",
                    "recall@10",
                    "recall@20",
                    "mrr@10",
                    "ndcg@10",
                    "all@2",
                    "all@5",
                    "all@10",
                )
            ),
        )
        for mode, r in results.items()
    ]
    if graph_report is not None:
        rows.append(("graph: entities / edges / edges per chunk", _graph_size(graph_report)))
        for kind, linked in graph_report["linkage"].items():
            rows.append((f"graph: {kind} questions linked within 0 / 1 / 2 hops", _linked(linked)))
    write_report(
        out_dir,
        report_name("retrieval", dataset, corpus, split) + ("-rerank" if reranker is not None else ""),
        report,
        [("mode: R@1 / R@5 / R@10 / R@20 / MRR@10 / nDCG@10 / all@2 / all@5 / all@10", ""), *rows],
    )
    return report


def _graph_report(settings: Settings, dataset: Path, qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The graph's size and how it links the questions' relevant passages (said as it goes)."""
    read = read_graph(settings)
    stats = graph_stats(settings, top=0, read=read)
    graph = read[0]
    report = {
        "entities": stats["entities"],
        "edges": stats["edges"],
        "edges_per_chunk": stats["edges_per_chunk"],
        "relations_by_label": stats["relations_by_label"],
        "linkage": linkage(graph, qrels, load_query_types(dataset)),
    }
    _say(f"graph: entities / edges / edges per chunk {_graph_size(report)}")
    for kind, linked in report["linkage"].items():
        _say(f"graph: {kind} questions linked within 0 / 1 / 2 hops {_linked(linked)}")
    return report


def _graph_size(report: dict[str, Any]) -> str:
    return f"{report['entities']} / {report['edges']} / {report['edges_per_chunk']}"


def _linked(linked: dict[str, Any]) -> str:
    shares = " / ".join(f"{linked[f'linked@{h}']:.3f}" for h in (0, 1, 2))
    return f"{shares} ({linked['questions']} questions)"
