"""ImageEmbedder deployment: queries against images, as vectors of the image-text model.

It holds :class:`actors.image_model.ImageTextModel` (``images.model``; texts through the model's
text side, which for Riverbed's LiT model is the index's own text embedder) and embeds:

- text queries (``/v1/images/search`` with ``query``, and ``/v1/search`` over images when the
  model has a text space of its own), batched across concurrent requests like the retriever's;
- image queries (``image_b64``), decoded with the ingest's own rules and limits (``images.max_bytes``,
  ``images.max_pixels``; PNG, JPEG, WebP, GIF): an image that cannot be read is a 400 naming
  ``image_b64``, never a 500.

**The model loads lazily**, on the first request that needs it, never in the constructor: a model
that is not there (Riverbed's own before `riverbed finetune image-text` trained it) must not keep
the app from starting, nor touch the text routes. Until it loads, every call raises
:class:`deployments.http_errors.ModelUnavailableError` (HTTP 503) with the reason, which names the
command that trains it; a failed load is tried again at most every :data:`RELOAD_AFTER_S`, so a
model trained while the app runs is picked up without a restart.

The model runs one call at a time (it is not thread-safe), on a worker thread, with
``serve.embedder_threads`` torch threads (the replica's share of the cores; the text query model
has ``serve.query_threads``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from ray import serve

from actors.image_decode import ImageLimits, InvalidImageError, decode, image_bytes
from actors.image_model import ImageTextModel
from deployments.http_errors import ModelUnavailableError
from deployments.stage_batching import Batcher
from schemas.errors import ConfigError, InvalidRequestError
from schemas.settings import ImagesConfig, Settings

log = logging.getLogger(__name__)

RELOAD_AFTER_S = 10.0
"""A model that failed to load is tried again by the first request at least this long after."""


class ImageTextEncoder(Protocol):
    """What the queries need of the model (:class:`ImageTextModel` has it)."""

    def warm_up(self) -> None: ...

    @property
    def dim(self) -> int: ...

    @property
    def text_space(self) -> str | None: ...

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def image_limits(images: ImagesConfig) -> ImageLimits:
    """The decoding limits of ``images`` for a query (no uri is read: a query comes inline)."""
    return ImageLimits(roots=(), allow_http=False, max_bytes=images.max_bytes, max_pixels=images.max_pixels)


class ImageQueryModel:
    """The image-text model for queries, without Serve: loads on first use (see the module doc).
    Thread-safe: calls to the model are serialised.

    ``text_model``: the index's text embedder (``embed.model``); ``same_space`` in
    :meth:`describe` says whether the model's text vectors are that embedder's (one query vector
    then searches passages and images alike)."""

    def __init__(
        self,
        images: ImagesConfig,
        text_model: str,
        cache_dir: Path,
        *,
        make_model: Callable[[], ImageTextEncoder] | None = None,
        reload_after_s: float = RELOAD_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.images = images
        self.text_model = text_model
        self.limits = image_limits(images)
        self._make = make_model or (
            lambda: ImageTextModel(images, text_model=text_model, cache_dir=cache_dir)
        )
        self._reload_after_s = reload_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._model: ImageTextEncoder | None = None
        self._problem: str | None = None
        self._failed_at = -float("inf")

    def model(self) -> ImageTextEncoder:
        """The loaded model; :class:`ModelUnavailableError` while it cannot be loaded."""
        with self._lock:
            return self._loaded()

    def _loaded(self) -> ImageTextEncoder:
        if self._model is not None:
            return self._model
        if self._problem is not None and self._clock() - self._failed_at < self._reload_after_s:
            raise ModelUnavailableError(self._problem)
        model = self._make()
        try:
            model.warm_up()
        except ConfigError as exc:
            self._problem = (
                f"image search is unavailable: {exc} (text search is not affected; image routes answer "
                "once the model loads)"
            )
            self._failed_at = self._clock()
            log.warning("%s", self._problem)
            raise ModelUnavailableError(self._problem) from exc
        self._model, self._problem = model, None
        return model

    def describe(self) -> dict[str, Any]:
        """``{"model", "dim", "text_space", "same_space"}``: ``text_space`` is the text embedder
        whose space the model shares (None: a space of its own), ``same_space`` whether that is
        the index's. Loads the model."""
        model = self.model()
        return {
            "model": self.images.model,
            "dim": model.dim,
            "text_space": model.text_space,
            "same_space": model.text_space == self.text_model,
        }

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One unit vector per text, in the model's text space, in order."""
        with self._lock:
            return self._loaded().embed_texts(texts)

    def embed_image_b64(self, image_b64: str) -> np.ndarray:
        """The unit vector of the base64 image. :class:`InvalidRequestError` (``param``
        ``image_b64``) when it is not base64 or not an image this app reads (the ingest's
        formats and limits); the model is loaded only for a readable image."""
        try:
            decoded = decode(image_bytes(image_b64, None, self.limits), self.limits)
        except InvalidImageError as exc:
            raise InvalidRequestError(f"image_b64: {exc}", param="image_b64") from exc
        with self._lock:
            vectors: np.ndarray = self._loaded().embed_images([decoded.image])
        return vectors[0]


@serve.deployment
class ImageEmbedder:
    """The deployment over :class:`ImageQueryModel`; calls that need the model raise
    :class:`ModelUnavailableError` (503) until it loads."""

    def __init__(self, settings: Settings) -> None:
        serve_config = settings.serve
        images = settings.images.model_copy(update={"num_cpus": float(serve_config.embedder_threads)})
        self.queries = ImageQueryModel(images, settings.embed.model, settings.cache_dir)
        search = serve_config.search  # concurrent text queries share one forward pass
        self._texts: Batcher[str, np.ndarray] = Batcher(
            self._embed_texts, search.embed_batch_size, search.embed_batch_wait_s
        )

    async def describe(self) -> dict[str, Any]:
        """See :meth:`ImageQueryModel.describe` (the first call loads the model, off the loop)."""
        return await asyncio.to_thread(self.queries.describe)

    async def embed_text(self, text: str) -> np.ndarray:
        """The text's vector in the model's text space (concurrent calls share one forward pass)."""
        return await self._texts(text)

    async def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        vectors = await asyncio.to_thread(self.queries.embed_texts, texts)
        return list(vectors)

    async def embed_image(self, image_b64: str) -> np.ndarray:
        """The vector of one base64 image (400 naming ``image_b64`` when it cannot be read)."""
        return await asyncio.to_thread(self.queries.embed_image_b64, image_b64)
