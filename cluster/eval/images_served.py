"""`riverbed eval images`: image-text quality through the real pipeline and the HTTP app.

# INDEX: the dataset split's captioned images produced as inline image envelopes to a fresh images
#   topic, ingested by the real pipeline (Kafka → decode → image embedder → image shards) into a
#   throwaway index, served by the real app
# TEXT → IMAGE: each distinct caption sent to ``POST /v1/images/search`` with k = every image, so
#   each answer scores all images against that caption: precision and recall at 10 from its top 10,
#   and zero-shot caption accuracy from all of them (an image's predicted caption is the one whose
#   query scored it highest)
# IMAGE → IMAGE: each image sent as ``image_b64`` (k 11; the image itself left out): precision at 10
# MODEL: the same scores computed from the model in this process (:func:`evaluate_image_text`), so
#   a gap between the two is the serving path's, not the model's
# CONTACT SHEET: the top hits' thumbnails (as the app returns them) for a few text queries, some
#   of them paraphrases of a caption, framed green when the hit has the expected caption
# Relevance is caption equality (easy-vqa: the same colour and shape).
"""

from __future__ import annotations

import base64
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from actors.image_model import ImageTextModel
from cluster.bench.report import image_run_settings, machine, write_report
from cluster.eval.images import evaluate_image_text
from cluster.image_datasets import ImageDataset, load_image_dataset
from cluster.pipeline import drop_index
from cluster.producer import produce_all
from cluster.serving import start_serving
from schemas.envelope import ImageEnvelope
from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)

K = 10
SCORES = ("caption_accuracy", f"text_to_image_p@{K}", f"text_to_image_r@{K}", f"image_to_image_p@{K}")
MAX_IMAGES = 999
SHEET_QUERIES = (
    ("a red circle", "a red circle"),
    ("a blue triangle", "a blue triangle"),
    ("a green rectangle", "a green rectangle"),
    ("a yellow shape with three sides", "a yellow triangle"),
    ("something round and gray", "a gray circle"),
)
"""(query, the caption its hits should have) for the contact sheet: captions and paraphrases."""
SHEET_HITS = 8


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def eval_images(base: Settings, dataset: str, split: str, limit: int | None, out_dir: Path) -> dict[str, Any]:
    """Scores ``dataset``'s ``split`` (the first ``limit`` captioned images) through the pipeline and
    the app, and with the model directly; writes ``images.json`` and ``images.md`` to ``out_dir``."""
    data = load_image_dataset(dataset, split, limit=limit)
    if not 2 <= len(data.items) <= MAX_IMAGES:
        raise ConfigError(
            f"{data.name} {split}: {len(data.items)} captioned images; the served evaluation takes 2 to "
            f"{MAX_IMAGES} (each caption query scores every image; serve.search.max_k is at most 1000): "
            "use --limit"
        )
    # k up to every image: one caption query then scores them all
    max_k = max(base.serve.search.max_k, len(data.items) + 1)
    settings = image_run_settings(base, "eval-images", max_k=max_k)
    topics = settings.kafka.topics
    t0 = time.monotonic()
    try:
        produce_all(_servers(settings), topics.images, _envelopes(data), settings.kafka.max_record_bytes)
        serving = start_serving(settings, ingest=True)
        try:
            assert serving.pipeline is not None
            serving.pipeline.wait_idle(interval_s=0.5)
            ingest_s = time.monotonic() - t0
            _say(f"ingested {len(data.items)} images in {ingest_s:.0f} s; querying {serving.url}")
            with httpx.Client(base_url=serving.url, timeout=120) as http:
                served = served_scores(http, data)
                sheet_path = out_dir / f"images-contact-sheet-{data.name}-{split}.png"
                sheet = write_contact_sheet(http, _sheet_queries(data), sheet_path)
        finally:
            serving.stop()
    finally:
        drop_index(settings.image_side(), [])
        drop_index(settings, [topics.documents, topics.images, topics.dead_letter])

    model = ImageTextModel(base.images, text_model=base.embed.model, cache_dir=base.cache_dir)
    direct = evaluate_image_text(model, data, K)
    report: dict[str, Any] = {
        "dataset": data.name,
        "split": split,
        "identity": data.identity,
        "images": len(data.items),
        "captions": len(data.captions),
        "model": base.images.model,
        "model_location": model.location,
        "served": served,
        "model_direct": {key: direct[key] for key in served if key in direct},
        "ingest_s": round(ingest_s, 1),
        "contact_sheet": {"path": str(sheet[0]), "queries": sheet[1]},
        "machine": machine(),
    }
    rows = [
        ("images / captions", f"{len(data.items)} / {len(data.captions)} ({data.name} {split})"),
        *(
            (f"{name} (served; model direct)", f"{served[name]:.3f}; {direct[name]:.3f}")
            for name in (
                "caption_accuracy",
                f"text_to_image_p@{K}",
                f"text_to_image_r@{K}",
                f"image_to_image_p@{K}",
            )
        ),
        ("chance accuracy", f"{served['chance_accuracy']:.3f}"),
    ]
    write_report(out_dir, report_name(data.name, split), report, rows)
    return report


def report_name(dataset: str, split: str) -> str:
    """``images-eval-<dataset>-<split>``: the report's file name (``.json``, ``.md``), apart from
    `riverbed bench images`' ``images``."""
    return f"images-eval-{dataset}-{split}"


def served_scores(http: httpx.Client, data: ImageDataset) -> dict[str, Any]:
    """The scores, every one asked of the app at ``http``."""
    ids = [_image_id(data, item.id) for item in data.items]
    truth = {image_id: item.caption for image_id, item in zip(ids, data.items, strict=True)}
    captions = data.captions
    n = len(ids)

    # TEXT → IMAGE: one query per caption, each scoring every image
    scores = np.full((len(captions), n), -np.inf)
    column = {image_id: i for i, image_id in enumerate(ids)}
    precision, recall = [], []
    for c, caption in enumerate(captions):
        hits = _search(http, {"query": caption, "k": n})
        for hit in hits:
            scores[c, column[hit["image_id"]]] = hit["score"]
        relevant = sum(1 for label in truth.values() if label == caption)
        if relevant:  # a caption no image of the cut has is a wrong answer for accuracy only
            found = sum(1 for hit in hits[:K] if truth[hit["image_id"]] == caption)
            precision.append(found / K)
            recall.append(found / relevant)
    predicted = np.argmax(scores, axis=0)
    accuracy = float(np.mean([captions[predicted[i]] == truth[ids[i]] for i in range(n)]))

    # IMAGE → IMAGE: each image, itself left out
    neighbours = []
    for item, image_id in zip(data.items, ids, strict=True):
        image_b64 = base64.b64encode(item.path.read_bytes()).decode()
        hits = [h for h in _search(http, {"image_b64": image_b64, "k": K + 1}) if h["image_id"] != image_id]
        neighbours.append(sum(1 for hit in hits[:K] if truth[hit["image_id"]] == item.caption) / K)
    return {
        "images": n,
        "captions": len(captions),
        "chance_accuracy": 1 / len(captions),
        "caption_accuracy": accuracy,
        f"text_to_image_p@{K}": float(np.mean(precision)),
        f"text_to_image_r@{K}": float(np.mean(recall)),
        f"image_to_image_p@{K}": float(np.mean(neighbours)),
    }


def _sheet_queries(data: ImageDataset) -> list[tuple[str, str]]:
    """The contact sheet's queries: :data:`SHEET_QUERIES` whose caption the dataset has, else its
    first captions as their own queries."""
    chosen = [(q, c) for q, c in SHEET_QUERIES if c in data.captions]
    return chosen if len(chosen) >= 3 else [(c, c) for c in data.captions[:5]]


def write_contact_sheet(
    http: httpx.Client, queries: Sequence[tuple[str, str]], path: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """One row per ``(query, expected caption)``: the query, then the thumbnails of its top
    :data:`SHEET_HITS` image hits, framed green when the hit's caption is the expected one, red
    when not. Returns the PNG's path and, per query, the hits' captions."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    cell, pad, label_w = 96, 6, 300
    font = ImageFont.load_default(size=15)
    sheet = Image.new(
        "RGB", (label_w + SHEET_HITS * (cell + pad) + pad, len(queries) * (cell + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    rows = []
    for row, (query, expected) in enumerate(queries):
        hits = _search(http, {"query": query, "k": SHEET_HITS})
        y = pad + row * (cell + pad)
        draw.text((pad, y + cell // 2 - 18), f'"{query}"', fill="black", font=font)
        draw.text((pad, y + cell // 2 + 2), f"expect: {expected}", fill="dimgray", font=font)
        for col, hit in enumerate(hits):
            x = label_w + col * (cell + pad)
            right = hit["caption"] == expected
            draw.rectangle(
                (x - 3, y - 3, x + cell + 2, y + cell + 2), fill="forestgreen" if right else "firebrick"
            )
            if hit["thumbnail_b64"]:
                with Image.open(io.BytesIO(base64.b64decode(hit["thumbnail_b64"]))) as thumb:
                    sheet.paste(thumb.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        rows.append({"query": query, "expected": expected, "captions": [h["caption"] for h in hits]})
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path, rows


def _search(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = http.post("/v1/images/search", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/images/search answered {response.status_code}: {response.text[:300]}")
    return list(response.json()["hits"])


def _image_id(data: ImageDataset, item_id: str) -> str:
    return f"{data.name}-{data.split}-{item_id}"


def _envelopes(data: ImageDataset) -> Sequence[ImageEnvelope]:
    return [
        ImageEnvelope(
            id=_image_id(data, item.id),
            image_b64=base64.b64encode(item.path.read_bytes()).decode(),
            caption=item.caption,
            metadata={"dataset": data.name, "split": data.split},
        )
        for item in data.items
    ]


def _servers(settings: Settings) -> str:
    from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs

    servers = bootstrap_servers(settings)
    ensure_topics(
        servers, topic_specs(settings.kafka.topics), max_message_bytes=settings.kafka.max_record_bytes
    )
    return servers
