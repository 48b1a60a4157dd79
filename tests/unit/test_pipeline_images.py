"""The pipeline's image side without Ray: when an ingest consumes the images topic, and the image
embedder's batching (the actor's class, called in process)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from actors.image_model import ImageTextModel
from actors.models import resolve_model
from actors.testing.tiny_clip import save_tiny_clip
from cluster.pipeline import ImageEmbedderActor, image_embedder_options, images_enabled, ingest_image_config
from schemas.errors import ConfigError
from schemas.settings import ImagesConfig, Settings, load_settings
from schemas.topology import actor_name

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), resolve_model(MINILM).location)


def test_images_are_consumed_when_asked_or_when_the_model_is_there(tmp_path: Path, tiny_clip: Path):
    def settings(**images: object):
        return load_settings(overrides={"cache_dir": str(tmp_path / "cache"), "images": images})

    assert images_enabled(settings(ingest="auto", model=str(tiny_clip)))
    assert not images_enabled(settings(ingest=False, model=str(tiny_clip)))
    # Riverbed's own model, not trained in this (empty) cache: auto leaves the topic alone...
    assert not images_enabled(settings(ingest="auto"))
    # ...and asking for it says how to train it.
    with pytest.raises(ConfigError, match="riverbed finetune image-text --dataset easy-vqa"):
        images_enabled(settings(ingest=True))


def test_the_image_embedder_batches_by_pixels_and_returns_the_model_s_vectors(
    tmp_path: Path, tiny_clip: Path
) -> None:
    config = ImagesConfig(model=str(tiny_clip), device="cpu", num_cpus=1, batch_size=3, max_batch_pixels=5000)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (10, 20), (100, 30), (64, 64), (8, 8), (120, 90), (33, 47)]
    pixels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]

    actor = ImageEmbedderActor(config, MINILM, tmp_path)
    assert actor.work() == {"calls": 0, "images": 0, "seconds": 0.0, "cpu_seconds": 0.0}
    got = actor.embed(pixels)
    actor.embed(pixels[:2])
    work = actor.work()
    assert (work["calls"], work["images"]) == (2, len(pixels) + 2)
    assert work["cpu_seconds"] > 0 and work["seconds"] > 0

    from PIL import Image

    model = ImageTextModel(config, text_model=MINILM, cache_dir=tmp_path)
    expected = np.stack([model.embed_images([Image.fromarray(p)])[0] for p in pixels])
    assert got.shape == (len(pixels), model.dim) and got.dtype == np.float32
    assert np.allclose(got, expected, atol=1e-5)
    assert actor.describe() == {"model": str(tiny_clip), "dim": model.dim, "text_space": None}


def test_the_ingest_image_embedder_leaves_a_core_to_the_stream_unless_told(monkeypatch: pytest.MonkeyPatch):
    config = ImagesConfig(batch_size=8)
    for cores, threads in [(1, 1), (2, 1), (16, 15)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert ingest_image_config(config).num_cpus == threads
        assert ingest_image_config(config).batch_size == 8  # only the threads are filled in
    assert ingest_image_config(ImagesConfig(num_cpus=16)).num_cpus == 16
    assert config.num_cpus is None  # the setting itself is left as it was


def test_the_image_embedder_reserves_its_own_gpus_not_the_text_embedder_s():
    base = Settings.model_validate({"index": {"name": "news"}, "embed": {"num_gpus": 1}})
    options = image_embedder_options(base)
    assert options["num_gpus"] == 0.0, "one GPU for the text embedder must not be asked twice"
    assert options["name"] == actor_name("news-images", "embedder", 0)
    shared = base.model_copy(update={"images": base.images.model_copy(update={"num_gpus": 0.5})})
    assert image_embedder_options(shared)["num_gpus"] == 0.5
