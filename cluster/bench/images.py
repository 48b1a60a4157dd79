"""`riverbed bench images`: image ingest throughput next to the raw model forward, and training time.

# DATA: captioned images of a dataset split (easy-vqa's test split by default), decoded once
# RAW: ``ImageTextModel.embed_images`` on the same images in this process, in batches of
#   ``images.batch_size``, with the ingest's image embedder's threads (``images.num_cpus``, else
#   every core but one: ``cluster.pipeline.ingest_image_config``); measured before the first
#   pipeline run and after each one
# PIPELINE: the images produced as inline envelopes to a fresh topic first (a backlog), then
#   Kafka → image source → decode → image embedder actor → image shards, timed from when every
#   source consumes (the actors up) until every record is committed (polled every 0.5 s), into a
#   throwaway index dropped afterwards; ``runs`` times, each against the raw forwards around it
# TRAINING: the seconds per epoch the model's own training record holds (Riverbed's LiT model)
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Any

import ray

from actors.image_model import ImageTextModel
from actors.lit_model import LitRecord
from cluster.bench.report import image_run_settings, machine, write_bars, write_report
from cluster.image_datasets import load_image_dataset
from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import Pipeline, drop_index, ingest_image_config
from cluster.producer import produce_all
from schemas.envelope import ImageEnvelope
from schemas.errors import ConfigError
from schemas.settings import Settings


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_images(
    base: Settings, dataset: str, split: str, limit: int | None, out_dir: Path, runs: int = 3
) -> dict[str, Any]:
    """``runs`` pipeline runs, each between two raw forwards (``runs + 1`` of them): a run's ratio
    is its pipeline rate over the mean of the raw rates just before and just after it, so a shared
    machine's drift over minutes moves both sides; the headline is the median run (the lower of the
    two middle ones when ``runs`` is even)."""
    from PIL import Image

    if runs < 1:
        raise ConfigError(f"bench images: runs must be at least 1, not {runs}")
    data = load_image_dataset(dataset, split, limit=limit)
    envelopes = [
        ImageEnvelope(
            id=f"{data.name}-{split}-{item.id}",
            image_b64=base64.b64encode(item.path.read_bytes()).decode(),
            caption=item.caption,
        )
        for item in data.items
    ]
    _say(f"data: {len(envelopes)} captioned images of {data.name} {split}; {runs} pipeline runs")

    config = ingest_image_config(base.images)
    model = ImageTextModel(config, text_model=base.embed.model, cache_dir=base.cache_dir)
    images = [Image.open(item.path).convert("RGB") for item in data.items]
    model.embed_images(images[: base.images.batch_size])  # warm-up: the first calls allocate

    def raw_rate() -> float:
        t0 = time.perf_counter()
        model.embed_images(images)
        rate = len(images) / (time.perf_counter() - t0)
        _say(f"raw forward: {rate:.1f} images/s")
        return rate

    raws = [raw_rate()]
    rows_of_runs: list[dict[str, Any]] = []
    for n in range(runs):
        run = _pipeline_run(base, envelopes)
        raws.append(raw_rate())
        rows_of_runs.append(_run_row(n + 1, run, raws[-2], raws[-1]))
        _say(
            f"run {n + 1}: pipeline {rows_of_runs[-1]['pipeline_images_per_s']} images/s, ratio "
            f"{rows_of_runs[-1]['ratio']} (embedder busy {rows_of_runs[-1]['embedder_busy']:.0%})"
        )
    headline = sorted(rows_of_runs, key=lambda r: r["ratio"])[(runs - 1) // 2]  # the median (lower)

    record = LitRecord.read(Path(model.location)) if Path(model.location).is_dir() else None
    epochs = [float(e["epoch_s"]) for e in record.history if "epoch_s" in e] if record else []
    result: dict[str, Any] = {
        "dataset": f"{data.name}:{split}",
        "images": len(envelopes),
        "model": base.images.model,
        "model_location": model.location,
        "dim": model.dim,
        "batch_size": base.images.batch_size,
        "threads": int(config.num_cpus or 1),
        "runs": rows_of_runs,
        "raw_images_per_s": headline["raw_images_per_s"],
        "pipeline_images": headline["pipeline_images"],
        "pipeline_s": headline["pipeline_s"],
        "pipeline_images_per_s": headline["pipeline_images_per_s"],
        "ratio": headline["ratio"],
        "headline_run": headline["run"],
        "training_epochs": len(epochs),
        "training_s_per_epoch": round(sum(epochs) / len(epochs), 1) if epochs else None,
        "training_images": (record.dataset if record else None),
        "machine": machine(),
    }
    threads = f"{result['threads']} thread{'' if result['threads'] == 1 else 's'}"
    rows = [
        ("images", f"{len(envelopes)} ({data.name} {split})"),
        ("runs", f"{runs}, each between two raw forwards; the median run below"),
        (
            f"raw `ImageTextModel.embed_images` (batch {base.images.batch_size}, {threads}), "
            "mean of the forwards around the run",
            f"{headline['raw_images_per_s']:.1f} images/s",
        ),
        (
            "pipeline (Kafka → decode → embed → shards, committed)",
            f"{headline['pipeline_images_per_s']:.1f} images/s",
        ),
        ("ratio pipeline / raw (median run)", f"{headline['ratio']:.2f}"),
        ("every run's ratio", ", ".join(f"{r['ratio']:.2f}" for r in rows_of_runs)),
        (
            "image embedder busy / its forward rate inside the pipeline (median run)",
            f"{headline['embedder_busy']:.0%} / {headline['embedder_images_per_s']:.1f} images/s",
        ),
    ]
    if epochs:
        per_epoch = f"{result['training_s_per_epoch']} ({len(epochs)} epochs)"
        rows.append(("training, seconds per epoch", per_epoch))
    write_report(out_dir, "images", result, rows)
    title = f"image ingest, {len(envelopes)} images, {runs} run{'' if runs == 1 else 's'}"
    ratios: dict[str, float] = {f"run {r['run']}": r["ratio"] for r in rows_of_runs}
    panels = {
        "images/s, median run": {
            "raw forward": headline["raw_images_per_s"],
            "pipeline": headline["pipeline_images_per_s"],
        },
        "pipeline / raw, every run": {**ratios, "target": 0.9},
        "image embedder busy": {f"run {r['run']}": r["embedder_busy"] for r in rows_of_runs},
    }
    write_bars(out_dir, "images", title, panels)
    return result


def _run_row(n: int, run: dict[str, Any], raw_before: float, raw_after: float) -> dict[str, Any]:
    """One pipeline run against the mean of the raw rates measured just before and after it; with
    the image embedder's own account of the run (:meth:`ImageEmbedderActor.work`): the share of the
    run it spent embedding, and its images per second of that."""
    raw = (raw_before + raw_after) / 2
    pipe_rate = run["images"] / run["seconds"]
    work = run["embedder"]
    return {
        "run": n,
        "raw_before_images_per_s": round(raw_before, 1),
        "raw_after_images_per_s": round(raw_after, 1),
        "raw_images_per_s": round(raw, 1),
        "pipeline_images": run["images"],
        "pipeline_s": round(run["seconds"], 2),
        "pipeline_images_per_s": round(pipe_rate, 1),
        "ratio": round(pipe_rate / raw, 3) if raw else 0.0,
        "embedder_images": int(work["images"]),
        "embedder_calls": int(work["calls"]),
        "embedder_busy": round(work["seconds"] / run["seconds"], 3),
        "embedder_images_per_s": round(work["images"] / work["seconds"], 1) if work["seconds"] else 0.0,
        "embedder_cpu_share": round(work["cpu_seconds"] / work["seconds"], 3) if work["seconds"] else 0.0,
    }


def _pipeline_run(base: Settings, envelopes: list[ImageEnvelope]) -> dict[str, Any]:
    """Ingests ``envelopes`` into a throwaway index from a fresh images topic where they already
    wait (a backlog: the producer's work is not the pipeline's): images and seconds, from when
    every source consumes until every record is committed."""
    settings = image_run_settings(base, "bench-images")
    topics = settings.kafka.topics
    servers = bootstrap_servers(settings)
    ensure_topics(servers, topic_specs(topics), max_message_bytes=settings.kafka.max_record_bytes)
    produce_all(servers, topics.images, envelopes, settings.kafka.max_record_bytes)
    pipeline = Pipeline(settings)
    try:
        pipeline.start()
        before = ray.get(pipeline.image_embedders[0].work.remote())  # before any source joins its group
        pipeline.wait_consuming(poll_s=0.05)  # the sources' start (imports, group join) is not ingest
        t0 = time.perf_counter()
        pipeline.wait_idle(interval_s=0.5)
        seconds = time.perf_counter() - t0
        after = ray.get(pipeline.image_embedders[0].work.remote())
    finally:
        results = pipeline.stop()
        drop_index(settings.image_side(), [])
        drop_index(settings, [topics.documents, topics.images, topics.dead_letter])
    work = {key: after[key] - before[key] for key in after}
    return {"images": sum(r.get("images", 0) for r in results), "seconds": seconds, "embedder": work}
