"""ImageTextModel on a tiny random CLIP saved locally (the generic Hugging Face path) and on a
tiny LiT model built with the packaged MiniLM (Riverbed's own path): shapes, norms, the save/load
round trip, and text vectors that are the index's own."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.embedder import Embedder
from actors.image_model import ImageTextModel
from actors.lit_model import LitRecord, build_lit_model, image_processor, save_lit_model, vision_tower
from actors.models import resolve_model
from actors.testing.tiny_clip import save_tiny_clip
from schemas.errors import ConfigError
from schemas.settings import EmbedConfig, ImageFinetuneConfig, ImagesConfig

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["a red circle", "a blue triangle", "", "Größe émigré 東京"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    pictures.append(Image.new("L", (64, 64), 200))  # grey: converted to RGB
    pictures.append(Image.new("RGBA", (20, 20), (255, 0, 0, 128)))
    return pictures


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def quiet() -> Iterator[list[str]]:
    """Everything transformers warns while the test runs (its logger does not propagate)."""
    collect = _Collect()
    library = logging.getLogger("transformers")
    library.addHandler(collect)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said: list[str] = []
        yield said
    library.removeHandler(collect)
    said += [r.getMessage() for r in collect.records] + [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), resolve_model(MINILM).location)


def _model(name: str, tmp_path: Path, batch_size: int = 2) -> ImageTextModel:
    config = ImagesConfig(model=name, device="cpu", batch_size=batch_size)
    return ImageTextModel(config, text_model=MINILM, cache_dir=tmp_path)


def _unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_tiny_clip_embeds_images_and_texts_as_unit_rows(
    tiny_clip: Path, tmp_path: Path, quiet: list[str]
) -> None:
    model = _model(str(tiny_clip), tmp_path)
    model.warm_up()
    assert (model.dim, model.model_name, model.text_space) == (24, str(tiny_clip), None)
    images = model.embed_images(_images())  # 5 images in batches of 2
    _unit_rows(images, 5, 24)
    texts = model.embed_texts(TEXTS)
    _unit_rows(texts, 4, 24)
    assert not np.allclose(texts[0], texts[1])
    # batches do not change a row: one by one gives the same vectors
    np.testing.assert_allclose(model.embed_images(_images()[:1]), images[:1], atol=1e-5)
    assert model.embed_images([]).shape == (0, 24) and model.embed_texts([]).shape == (0, 24)


def test_loading_a_model_warns_about_nothing(
    tiny_clip: Path, tiny_lit, tmp_path: Path, quiet: list[str]
) -> None:
    _model(str(tiny_clip), tmp_path).warm_up()
    _model(str(tiny_lit[0]), tmp_path).warm_up()
    assert quiet == []


def test_a_text_only_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not an image-text model|cannot be loaded"):
        _model(resolve_model(MINILM).location, tmp_path).warm_up()


def test_bad_text_input_is_refused(tiny_clip: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="single string"):
        _model(str(tiny_clip), tmp_path).embed_texts("a red circle")


@pytest.fixture(scope="module")
def tiny_lit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A LiT model: a tiny random vision tower with the packaged MiniLM as text tower, saved."""
    import torch

    torch.manual_seed(0)
    finetune = ImageFinetuneConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2)
    tower = vision_tower(finetune, 384).eval()
    text_location = resolve_model(MINILM).location
    directory = tmp_path_factory.mktemp("tiny-lit")
    record = LitRecord(text_model=MINILM, dim=384, image_size=16, captions=["a red circle"])
    save_lit_model(build_lit_model(tower, text_location), text_location, record, directory)
    return directory, tower


def _tower_vectors(tower: object, images: list[Image.Image], size: int) -> np.ndarray:
    import torch

    pixels = image_processor(size)(images=[i.convert("RGB") for i in images], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        out = tower(pixels).numpy()  # type: ignore[operator]
    return np.asarray(out / np.linalg.norm(out, axis=1, keepdims=True), dtype=np.float32)


def test_a_saved_lit_model_gives_the_trained_towers_image_vectors(tiny_lit, tmp_path: Path) -> None:
    directory, tower = tiny_lit
    model = _model(str(directory), tmp_path)
    assert (model.dim, model.text_space) == (384, MINILM)
    got = model.embed_images(_images())
    _unit_rows(got, 5, 384)
    np.testing.assert_allclose(got, _tower_vectors(tower, _images(), 16), atol=1e-5)


def test_lit_text_vectors_are_the_text_embedders(tiny_lit, tmp_path: Path) -> None:
    directory, _ = tiny_lit
    expected = Embedder(EmbedConfig(model=MINILM, device="cpu")).embed(TEXTS)
    np.testing.assert_allclose(_model(str(directory), tmp_path).embed_texts(TEXTS), expected, atol=1e-6)


def test_a_saved_lit_model_loads_with_transformers_alone(tiny_lit) -> None:
    """The directory is a plain VisionTextDualEncoderModel; only its get_text_features (the CLS
    pooler) is not the index's text space, which is why ImageTextModel does not use it."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, VisionTextDualEncoderModel

    directory, tower = tiny_lit
    model = AutoModel.from_pretrained(directory)
    assert isinstance(model, VisionTextDualEncoderModel)
    rgb = [image.convert("RGB") for image in _images()]
    pixels = AutoImageProcessor.from_pretrained(directory)(images=rgb, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(
            **AutoTokenizer.from_pretrained(directory)(["a red circle"], return_tensors="pt")
        )
    vectors = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(vectors, _tower_vectors(tower, _images(), 16), atol=1e-5)
    pooled = torch.nn.functional.normalize(text.pooler_output, dim=-1).numpy()[0]
    mean_pooled = Embedder(EmbedConfig(model=MINILM, device="cpu")).embed(["a red circle"])[0]
    assert float(pooled @ mean_pooled) < 0.99


def test_the_lit_record_round_trips(tmp_path: Path) -> None:
    record = LitRecord(text_model=MINILM, dim=384, image_size=64, key="k", history=[{"epoch": 1}])
    record.write(tmp_path)
    assert LitRecord.read(tmp_path) == record
    assert LitRecord.read(tmp_path / "elsewhere") is None
    (tmp_path / "riverbed_lit.json").write_text("{not json")
    with pytest.raises(ConfigError, match="LiT record"):
        LitRecord.read(tmp_path)
