"""The image path end to end: easy-vqa images through the real broker, Ray actors and an image
model (a tiny CLIP saved locally, loaded as any hub model would be) into the images index beside
the text index; exact counts, updates and deletes, poison images dead-lettered while the rest is
indexed, and the stored vectors are the model's own."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from actors.dead_letters import read_dead_letter_counts
from actors.image_model import ImageTextModel
from actors.models import resolve_model
from actors.testing.tiny_clip import save_tiny_clip
from cluster.image_datasets import CaptionedImage, load_image_dataset
from cluster.pipeline import Pipeline, named_shards
from cluster.stats import index_stats
from schemas.envelope import IMAGE_THUMBNAIL_KEY, IMAGE_URI_KEY, ImageEnvelope
from schemas.ids import chunk_id
from schemas.settings import Settings, load_settings
from tests.integration.ingest_helpers import produce as produce_to

N = 200


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = load_settings()
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), resolve_model(settings.embed.model).location)


@pytest.fixture
def image_settings(pipeline_settings: Settings, tiny_clip: Path, tmp_path: Path) -> Settings:
    dump = pipeline_settings.model_dump(mode="json")
    dump["images"].update(
        ingest=True, model=str(tiny_clip), device="cpu", num_cpus=1, uri_roots=[str(tmp_path / "root")]
    )
    return load_settings(overrides=dump)


def envelope(item: CaptionedImage, caption: str | None = None) -> ImageEnvelope:
    return ImageEnvelope(
        id=f"img-{item.id}",
        image_b64=base64.b64encode(item.path.read_bytes()).decode(),
        caption=item.caption if caption is None else caption,
        metadata={"split": "test", "shape": item.caption.split()[-1]},
    )


def produce(settings: Settings, envelopes: Iterable[ImageEnvelope], tombstones: Iterable[str] = ()) -> int:
    return produce_to(settings, envelopes, tombstones, topic=settings.kafka.topics.images)


def ingest_until_idle(settings: Settings) -> list[dict]:
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        assert pipeline.images
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
    finally:
        results = pipeline.stop()
    return results


def total(results: list[dict], key: str) -> int:
    return sum(r.get(key, 0) for r in results)


def stored_images(settings: Settings) -> dict[str, object]:
    """Every record of the images index, by image id, paged through each shard actor."""
    out: dict[str, object] = {}
    for shard in named_shards(settings.image_side()):
        after = ""
        while page := ray.get(shard.scan_chunks.remote(after, 500)):
            for record in page:
                assert record.document_id not in out, f"image {record.document_id} stored twice"
                assert record.chunk_id == chunk_id(record.document_id, 0)
                out[record.document_id] = record
            after = page[-1].chunk_id
    return out


def test_images_through_kafka_exact_counts_updates_deletes_and_poison(
    image_settings: Settings, tmp_path: Path
) -> None:
    s = image_settings
    items = load_image_dataset("easy-vqa", "test", limit=N).items
    assert len(items) == N
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(items[0].path, root / "by-uri.png")
    by_uri = ImageEnvelope(id="img-by-uri", uri=str(root / "by-uri.png"), caption="from a file")
    poison = [
        ImageEnvelope(id="bad-bytes", image_b64=base64.b64encode(b"not an image at all").decode()),
        ImageEnvelope(id="bad-outside", uri=str(items[1].path)),  # a real file, but not under a root
        ImageEnvelope(id="bad-missing", uri=str(root / "missing.png")),
    ]
    assert produce(s, [*map(envelope, items[:100]), *poison, by_uri, *map(envelope, items[100:])]) == N + 4

    first = ingest_until_idle(s)
    assert total(first, "images") == N + 1
    stats = index_stats(s)
    assert stats["images"] == N + 1 and sum(stats["images_per_shard"].values()) == N + 1
    assert stats["documents"] == 0 and stats["lag"] == 0
    dead = read_dead_letter_counts(s.kafka.bootstrap_servers, s.kafka.topics.dead_letter)
    assert dead == {"invalid_image": 3}

    stored = stored_images(s)
    assert set(stored) == {f"img-{i.id}" for i in items} | {"img-by-uri"}
    record = stored[f"img-{items[5].id}"]
    assert record.text == items[5].caption and record.metadata["shape"] == items[5].caption.split()[-1]
    assert IMAGE_URI_KEY not in record.metadata
    thumb = Image.open(io.BytesIO(base64.b64decode(record.metadata[IMAGE_THUMBNAIL_KEY])))
    assert thumb.format == "JPEG" and max(thumb.size) <= s.images.thumbnail_size
    assert stored["img-by-uri"].metadata[IMAGE_URI_KEY] == str(root / "by-uri.png")

    # The stored vectors are the image model's own vectors of the same pixels.
    model = ImageTextModel(s.images, text_model=s.embed.model, cache_dir=s.cache_dir)
    sample = items[:8]
    expected = model.embed_images([Image.open(i.path).convert("RGB") for i in sample])
    got = np.stack([stored[f"img-{i.id}"].vector for i in sample])
    assert np.allclose(got, expected, atol=1e-5)

    # Updates (new captions), deletes (op and tombstone), identical re-sends.
    updated = {f"img-{i.id}": f"updated {n}" for n, i in enumerate(items[10:20])}
    deleted = [f"img-{i.id}" for i in items[20:30]]
    changes = [envelope(i, updated[f"img-{i.id}"]) for i in items[10:20]]
    changes += [ImageEnvelope(id=d, op="delete") for d in deleted[:5]]
    changes += [envelope(i) for i in items[40:45]]  # unchanged
    assert produce(s, changes, tombstones=deleted[5:]) == 25

    second = ingest_until_idle(s)
    assert (total(second, "images"), total(second, "unchanged"), total(second, "deletes")) == (10, 5, 10)
    assert index_stats(s)["images"] == N + 1 - 10
    stored = stored_images(s)
    assert not set(deleted) & set(stored)
    assert {i: stored[i].text for i in updated} == updated
