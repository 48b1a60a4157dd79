"""Images and texts to vectors in one space, with any CLIP-style model or Riverbed's own.

:class:`ImageTextModel` is the plain class behind the image embedder (``cluster/`` wraps it with
``ray.remote``). ``images.model`` picks the encoder by what its directory holds:

- **Riverbed's LiT model** (a ``riverbed_lit.json`` beside the weights; ``riverbed/lit-easy-vqa``
  names the one trained with the current settings, see ``actors.models``): images through
  ``get_image_features`` of the saved ``VisionTextDualEncoderModel``; texts through
  :class:`actors.embedder.Embedder` of the text embedder the record names. Its image vectors are
  thus in the space of the index's text chunks, and its text vectors *are* the index's
  (``actors.lit_model`` explains why ``get_text_features`` is not used for them).
- **Any Hugging Face CLIP/SigLIP-style model** (``AutoModel`` with ``get_image_features`` and
  ``get_text_features``, ``AutoImageProcessor``, ``AutoTokenizer``): its own image and text
  vectors, in its own space (a hub id such as ``openai/clip-vit-base-patch32``, or a path).

Both return float32 rows of unit L2 norm, row ``i`` for input ``i``. Device: ``images.device``
(``auto``: CUDA when available, with fp16 weights; else CPU, fp32, with ``int(images.num_cpus)``
torch threads or every usable core; ``torch.set_num_threads`` is process-wide, so one model per
process, as in an actor). ``__init__`` is cheap; :meth:`ImageTextModel.warm_up` loads (idempotent).
Not thread-safe: one call at a time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from actors.embedder import Embedder, check_texts, cpu_threads
from actors.lit_model import LitRecord
from actors.models import resolve_image_model
from schemas.errors import ConfigError
from schemas.settings import EmbedConfig, ImagesConfig

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

logger = logging.getLogger(__name__)

# SigLIP was trained on texts padded to the tokenizer's full length; its text vectors differ
# (and are worse) with shorter padding.
PAD_TO_MAX_LENGTH = frozenset({"siglip", "siglip2"})


class _Encoder(Protocol):
    def images(self, images: list[Image]) -> np.ndarray: ...

    def texts(self, texts: list[str]) -> np.ndarray: ...


class ImageTextModel:
    """Embeds images and texts with the model ``config.model`` names (see the module docstring).

    ``text_model`` is the index's text embedder id (``embed.model``) and ``cache_dir`` the cache
    (``cache_dir``): together with ``config.finetune`` they locate Riverbed's trained model.
    """

    def __init__(self, config: ImagesConfig, *, text_model: str, cache_dir: Path) -> None:
        self._config = config
        self._text_model = text_model
        self._cache_dir = cache_dir
        self._encoder: _Encoder | None = None
        self._dim = 0
        self._text_space: str | None = None
        self._location = ""

    def warm_up(self) -> None:
        """Loads the model. ConfigError when it cannot be loaded (not trained yet, not a
        CLIP-style model, CUDA asked for and absent)."""
        self._load()

    def _load(self) -> _Encoder:
        if self._encoder is not None:
            return self._encoder
        import torch

        device = self._config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("images.device is 'cuda' but torch sees no CUDA device")
        if device == "cpu":
            torch.set_num_threads(cpu_threads(self._config.num_cpus))
        resolved = resolve_image_model(self._config, self._text_model, self._cache_dir)
        encoder, self._text_space = open_encoder(self._config, resolved.location, device)
        if self._text_space not in (None, self._text_model):
            logger.warning(
                "images.model %s embeds text with %s, the index with %s: its images are not in the space "
                "of this index's text chunks",
                *(self._config.model, self._text_space, self._text_model),
            )
        self._dim = int(encoder.texts(["a probe"]).shape[1])
        self._location, self._encoder = resolved.location, encoder
        logger.info(
            "image model ready: %s (%s) on %s, dim %d, text by %s",
            *(self._config.model, resolved.location, device, self._dim, self._text_space or "its own tower"),
        )
        return encoder

    @property
    def model_name(self) -> str:
        """The model's id as configured (``images.model``)."""
        return self._config.model

    @property
    def location(self) -> str:
        """Where its files were loaded from (a directory, or a hub id)."""
        self._load()
        return self._location

    @property
    def dim(self) -> int:
        """Length of each vector."""
        self._load()
        return self._dim

    @property
    def text_space(self) -> str | None:
        """The text embedder whose space this model's vectors share (a LiT model's), or None: the
        model has its own text tower and space."""
        self._load()
        return self._text_space

    def embed_images(self, images: Sequence[Image]) -> np.ndarray:
        """Vectors of ``images`` (any mode; converted to RGB): shape ``(len(images), dim)``,
        float32, unit L2 norm, in order. ``[]`` gives ``(0, dim)``."""
        encoder = self._load()
        items = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return self._batched(items, encoder.images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts``, as :meth:`embed_images`. ValueError if an item is not a ``str``."""
        items = check_texts(texts)
        return self._batched(items, self._load().texts)

    def _batched(self, items: list[Any], encode: Any) -> np.ndarray:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        size = self._config.batch_size
        for start in range(0, len(items), size):
            out[start : start + size] = _normalised(encode(items[start : start + size]))
        return out


def open_encoder(config: ImagesConfig, location: str, device: str) -> tuple[_Encoder, str | None]:
    """The encoder for the model files at ``location``, and the text embedder whose space it
    shares: Riverbed's LiT model when the directory holds its record, any CLIP-style model
    otherwise (its own space: None)."""
    path = Path(location)
    record = LitRecord.read(path) if path.is_dir() else None
    if record is not None:
        return _LitEncoder(path, record, device, config), record.text_model
    return _HfEncoder(location, device, config.model), None


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _features(output: Any) -> torch.Tensor:
    """The embedding tensor of a ``get_*_features`` result: a tensor (older transformers) or an
    output whose ``pooler_output`` holds the projected embeddings (transformers 5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise ConfigError(f"get_*_features returned {type(output).__name__} without a pooler_output tensor")
    return pooled


class _HfEncoder:
    """A CLIP/SigLIP-style transformers model: its own image and text towers."""

    def __init__(self, location: str, device: str, name: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(location)
            # backend unset: torchvision when installed, else PIL, silently
            self._processor = AutoImageProcessor.from_pretrained(location)
            self._tokenizer = AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"images.model {name!r} cannot be loaded from {location}: {exc}") from exc
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ConfigError(
                f"images.model {name!r} ({type(model).__name__}) is not an image-text model: it has no "
                "get_image_features and get_text_features"
            )
        self._device = torch.device(device)
        self._model = (model.half() if device == "cuda" else model).to(self._device).eval()
        self._dtype = next(self._model.parameters()).dtype
        config = model.config
        self._padding: bool | str = "max_length" if config.model_type in PAD_TO_MAX_LENGTH else True
        limits = [getattr(getattr(config, "text_config", config), "max_position_embeddings", None)]
        limits.append(self._tokenizer.model_max_length)
        self._max_length = min(int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
        accepted = inspect.signature(model.get_text_features).parameters
        self._text_inputs = {"input_ids", "attention_mask", "token_type_ids", "position_ids"} & set(accepted)

    def images(self, images: list[Image]) -> np.ndarray:
        return _image_features(self._processor, self._model, self._device, self._dtype, images)

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        encoded = self._tokenizer(
            texts, padding=self._padding, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        inputs = {key: value.to(self._device) for key, value in encoded.items() if key in self._text_inputs}
        with torch.inference_mode():
            return _features(self._model.get_text_features(**inputs)).float().cpu().numpy()


def _image_features(processor: Any, model: Any, device: Any, dtype: Any, images: list[Image]) -> np.ndarray:
    """``model.get_image_features`` of ``images`` as ``processor`` prepares them (not normalised)."""
    import torch

    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=pixels.to(device, dtype))
        return _features(out).float().cpu().numpy()


class _LitEncoder:
    """Riverbed's LiT model: its vision side for images, the recorded text embedder for texts."""

    def __init__(self, location: Path, record: LitRecord, device: str, config: ImagesConfig) -> None:
        import torch
        from transformers import AutoImageProcessor, VisionTextDualEncoderModel

        try:
            model: Any = VisionTextDualEncoderModel.from_pretrained(location)
            self._processor = AutoImageProcessor.from_pretrained(location)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"images.model {config.model!r}: {location} cannot be loaded: {exc}") from exc
        model.text_model = None  # texts go through the text embedder; free the tower's weights
        self._device = torch.device(device)
        self._model = (model.half() if device == "cuda" else model).to(self._device).eval()
        self._dtype = next(self._model.parameters()).dtype
        self._text = Embedder(EmbedConfig(model=record.text_model, device=device, num_cpus=config.num_cpus))
        self._text.warm_up()
        if self._text.dim != record.dim:
            raise ConfigError(
                f"{location} holds {record.dim}-dimensional image vectors but its text embedder "
                f"{record.text_model} gives {self._text.dim}"
            )

    def images(self, images: list[Image]) -> np.ndarray:
        return _image_features(self._processor, self._model, self._device, self._dtype, images)

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._text.embed(texts)
