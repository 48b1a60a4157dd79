"""`riverbed bench images`: image ingest throughput next to the raw model forward, and training time.

# DATA: captioned images of a dataset split (easy-vqa's test split by default), decoded once
# RAW: ``ImageTextModel.embed_images`` on the same images in this process, in batches of
#   ``images.batch_size``, with the ingest's image embedder's threads (``images.num_cpus``, else
#   every core but one: ``cluster.pipeline.ingest_image_config``)
# PIPELINE: the images produced as inline envelopes to a fresh topic first (a backlog), then
#   Kafka → image source → decode → image embedder actor → image shards, timed from when every
#   source consumes (the actors up) until every record is committed, into a throwaway index
#   dropped afterwards
# TRAINING: the seconds per epoch the model's own training record holds (Riverbed's LiT model)
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Any

from actors.image_model import ImageTextModel
from actors.lit_model import LitRecord
from cluster.bench.report import image_run_settings, machine, write_ratio_bars, write_report
from cluster.image_datasets import load_image_dataset
from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import Pipeline, drop_index, ingest_image_config
from cluster.producer import produce_all
from schemas.envelope import ImageEnvelope
from schemas.settings import Settings


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_images(
    base: Settings, dataset: str, split: str, limit: int | None, out_dir: Path
) -> dict[str, Any]:
    from PIL import Image

    data = load_image_dataset(dataset, split, limit=limit)
    envelopes = [
        ImageEnvelope(
            id=f"{data.name}-{split}-{item.id}",
            image_b64=base64.b64encode(item.path.read_bytes()).decode(),
            caption=item.caption,
        )
        for item in data.items
    ]
    _say(f"data: {len(envelopes)} captioned images of {data.name} {split}")

    # RAW
    config = ingest_image_config(base.images)
    model = ImageTextModel(config, text_model=base.embed.model, cache_dir=base.cache_dir)
    images = [Image.open(item.path).convert("RGB") for item in data.items]
    model.embed_images(images[: base.images.batch_size])  # warm-up: the first calls allocate
    t0 = time.perf_counter()
    model.embed_images(images)
    raw_s = time.perf_counter() - t0
    raw_rate = len(images) / raw_s
    _say(f"raw forward: {raw_rate:.1f} images/s")

    # PIPELINE
    run = _pipeline_run(base, envelopes)
    pipe_rate = run["images"] / run["seconds"]
    _say(f"pipeline: {pipe_rate:.1f} images/s")

    # TRAINING
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
        "raw_s": round(raw_s, 2),
        "raw_images_per_s": round(raw_rate, 1),
        "pipeline_images": run["images"],
        "pipeline_s": round(run["seconds"], 2),
        "pipeline_images_per_s": round(pipe_rate, 1),
        "ratio": round(pipe_rate / raw_rate, 3),
        "training_epochs": len(epochs),
        "training_s_per_epoch": round(sum(epochs) / len(epochs), 1) if epochs else None,
        "training_images": (record.dataset if record else None),
        "machine": machine(),
    }
    rows = [
        ("images", f"{len(envelopes)} ({data.name} {split})"),
        (
            f"raw `ImageTextModel.embed_images` (batch {base.images.batch_size}, "
            f"{result['threads']} thread{'' if result['threads'] == 1 else 's'})",
            f"{raw_rate:.1f} images/s",
        ),
        ("pipeline (Kafka → decode → embed → shards, committed)", f"{pipe_rate:.1f} images/s"),
        ("ratio pipeline / raw", f"{pipe_rate / raw_rate:.2f}"),
    ]
    if epochs:
        per_epoch = f"{result['training_s_per_epoch']} ({len(epochs)} epochs)"
        rows.append(("training, seconds per epoch", per_epoch))
    write_report(out_dir, "images", result, rows)
    title = f"image ingest, {len(envelopes)} images"
    write_ratio_bars(out_dir, "images", title, "images/s", ("raw forward", raw_rate), pipe_rate)
    return result


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
        pipeline.wait_consuming(poll_s=0.05)  # the sources' start (imports, group join) is not ingest
        t0 = time.perf_counter()
        pipeline.wait_idle(interval_s=0.5)
        seconds = time.perf_counter() - t0
    finally:
        results = pipeline.stop()
        drop_index(settings.image_side(), [])
        drop_index(settings, [topics.documents, topics.images, topics.dead_letter])
    return {"images": sum(r.get("images", 0) for r in results), "seconds": seconds}
