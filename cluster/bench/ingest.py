"""`riverbed bench ingest`: pipeline throughput next to raw ``SentenceTransformer.encode``.

# CORPUS: the sample passages (``--repeat`` copies under different id prefixes), chunked by the
#   real chunker, so both sides embed exactly the same chunk texts
# RAW: ``SentenceTransformer.encode(texts, batch_size=32)`` in this process, every core
# PIPELINE: produce to a fresh topic, then Kafka → sources → chunker → embedder actor → shards,
#   timed from the moment the actors are up until every record is committed; once per backend
#   named (``--backend faiss,milvus``), each into a throwaway index dropped afterwards
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.chunker import Chunker
from actors.models import resolve_model
from cluster.bench.report import machine, write_bars, write_report
from cluster.pipeline import Pipeline, drop_index
from cluster.producer import produce_all, read_records
from schemas.envelope import DocumentEnvelope
from schemas.settings import Settings, load_settings

log = logging.getLogger(__name__)


def load_corpus(path: Path, repeat: int) -> list[DocumentEnvelope]:
    base = [r.envelope for r in read_records(path) if isinstance(r.envelope, DocumentEnvelope)]
    return [
        d.model_copy(update={"id": f"r{i}/{d.id}"}) if repeat > 1 else d for i in range(repeat) for d in base
    ]


def raw_encode(settings: Settings, texts: list[str]) -> float:
    """Seconds for plain ``SentenceTransformer.encode`` of ``texts`` (batch 32, normalised)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(settings.embed.model).location, device="cpu")
    model.encode(texts[:64], batch_size=32, show_progress_bar=False)  # warm-up: first calls allocate
    t0 = time.perf_counter()
    model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - t0


def bench_ingest(
    base: Settings, corpus: Path, repeat: int, out_dir: Path, backends: Sequence[str] = ("faiss",)
) -> dict[str, Any]:
    docs = load_corpus(corpus, repeat)
    chunker = Chunker(base.chunk, base.embed.model)
    t0 = time.perf_counter()
    texts = [c.text for doc in chunker.chunk_batch(docs) for c in doc.chunks]
    chunk_s = time.perf_counter() - t0
    print(
        f"corpus: {len(docs)} documents → {len(texts)} chunks (chunked in {chunk_s:.1f} s)", file=sys.stderr
    )

    # RAW
    raw_s = raw_encode(base, texts)
    raw_rate = len(texts) / raw_s
    print(f"raw encode: {raw_rate:.1f} chunks/s", file=sys.stderr)

    # PIPELINE, once per backend
    runs = {name: _pipeline_run(base, name, docs, raw_rate) for name in backends}
    result = {
        "documents": len(docs),
        "chunks": len(texts),
        "raw_encode_s": round(raw_s, 2),
        "raw_chunks_per_s": round(raw_rate, 1),
        "backends": runs,
        "model": base.embed.model,
        "shards": base.index.n_shards,
        "milvus": "server" if base.index.milvus.uri else "lite",
        "machine": machine(),
    }
    rows = [
        ("documents / chunks", f"{len(docs)} / {len(texts)}"),
        ("raw `SentenceTransformer.encode` (batch 32)", f"{raw_rate:.1f} chunks/s"),
    ]
    for name, run in runs.items():
        rows += [
            (
                f"pipeline, {name} (Kafka → chunk → embed → shards, committed)",
                f"{run['pipeline_chunks_per_s']} chunks/s",
            ),
            (f"ratio pipeline / raw, {name}", f"{run['ratio']:.2f}"),
        ]
    write_report(out_dir, "ingest", result, rows)
    write_bars(
        out_dir,
        "ingest",
        f"ingest, {len(texts)} chunks of {len(docs)} documents",
        {
            "chunks/s": {
                "raw encode": raw_rate,
                **{name: run["pipeline_chunks_per_s"] for name, run in runs.items()},
            },
            "pipeline / raw": {**{name: run["ratio"] for name, run in runs.items()}, "target": 0.9},
        },
    )
    return result


def _pipeline_run(
    base: Settings, backend: str, docs: list[DocumentEnvelope], raw_rate: float
) -> dict[str, Any]:
    """Ingests ``docs`` into a throwaway index of ``backend`` from a fresh topic: its figures."""
    import ray

    run = uuid.uuid4().hex[:8]
    index = base.index.model_copy(update={"backend": backend, "name": f"bench-{run}"})
    if backend != "faiss":
        index = index.model_copy(update={"max_shard_bytes": None})
    settings = load_settings(
        overrides={
            **base.model_dump(mode="json"),
            "index": index.model_dump(mode="json"),
            "images": {**base.images.model_dump(mode="json"), "ingest": False},  # text alone
            "kafka": {
                **base.kafka.model_dump(mode="json"),
                "topics": {
                    **base.kafka.topics.model_dump(mode="json"),
                    "documents": f"bench.{run}.documents",
                    "dead_letter": f"bench.{run}.dead-letter",
                },
            },
        }
    )
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        limits = ray.get(pipeline.embedders[0].describe.remote())["batch_limits"]
        produce_all(pipeline.servers, settings.kafka.topics.documents, docs, settings.kafka.max_record_bytes)
        t0 = time.perf_counter()
        pipeline.wait_idle(interval_s=0.2)
        pipe_s = time.perf_counter() - t0
    finally:
        results = pipeline.stop()
        drop_index(settings, [settings.kafka.topics.documents, settings.kafka.topics.dead_letter])
    chunks = sum(r.get("chunks", 0) for r in results)
    pipe_rate = chunks / pipe_s
    print(f"pipeline, {backend}: {pipe_rate:.1f} chunks/s", file=sys.stderr)
    return {
        "pipeline_chunks": chunks,
        "pipeline_s": round(pipe_s, 2),
        "pipeline_chunks_per_s": round(pipe_rate, 1),
        "ratio": round(pipe_rate / raw_rate, 3),
        "batch_limits": limits,
    }
