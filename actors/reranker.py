"""Cross-encoder reranking: a question and a passage read together, one relevance score per pair.

:class:`Reranker` wraps a sentence-transformers ``CrossEncoder``: Riverbed's own (named
:data:`~schemas.settings.TRAINED_RERANKER`, found in the cache once `riverbed finetune reranker`
has trained it) or any CrossEncoder id or local path. A passage is read as its title and text
(:func:`pair_text`), the same way the trainer shows it, so what the model learned is what it sees.
Scores are the model's own activation of its one logit (sigmoid for a one-label model): higher is
more relevant; only their order within one query matters. torch is imported on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.embedder import cpu_threads
from actors.models import resolve_text_model
from schemas.errors import ConfigError
from schemas.settings import FinetuneConfig, SearchConfig

log = logging.getLogger(__name__)

BATCH_SIZE = 32


def pair_text(title: str | None, text: str) -> str:
    """The passage side of a (question, passage) pair: ``"title: text"``, or the text alone."""
    return f"{title}: {text}" if title else text


class Reranker:
    """Scores (query, passage) pairs with a cross-encoder. Thread-safe; the model loads on first
    use (or :meth:`warm_up`)."""

    def __init__(
        self,
        config: SearchConfig,
        cache_dir: Path,
        finetune: FinetuneConfig | None = None,
        num_cpus: float | None = None,
    ) -> None:
        self._config = config
        self._resolved = resolve_text_model(config.rerank_model, finetune or FinetuneConfig(), cache_dir)
        self._threads = cpu_threads(num_cpus)
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The model as configured (``serve.search.rerank_model``)."""
        return self._resolved.name

    @property
    def location(self) -> str:
        """Where its files were loaded from."""
        return self._resolved.location

    def warm_up(self) -> None:
        self._load()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                import torch
                from sentence_transformers import CrossEncoder

                device = self._config.rerank_device
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                if device == "cpu":
                    torch.set_num_threads(self._threads)
                try:
                    model = CrossEncoder(
                        self._resolved.location, device=device, max_length=self._config.rerank_max_tokens
                    )
                except (OSError, ValueError) as exc:
                    raise ConfigError(
                        f"serve.search.rerank_model {self._resolved.name!r} cannot be loaded as a "
                        f"cross-encoder ({self._resolved.location}): {exc}"
                    ) from exc
                if model.num_labels != 1:
                    raise ConfigError(
                        f"serve.search.rerank_model {self._resolved.name!r} has {model.num_labels} labels: "
                        "a reranker gives one score per pair"
                    )
                self._model = model
            return self._model

    def score(self, query: str, passages: Sequence[tuple[str | None, str]]) -> np.ndarray:
        """One score per ``(title, text)`` passage for ``query``: shape ``(len(passages),)``."""
        return self.score_many([query], [passages])[0]

    def score_many(
        self, queries: Sequence[str], passages: Sequence[Sequence[tuple[str | None, str]]]
    ) -> list[np.ndarray]:
        """:meth:`score` for several queries in one pass over the model (their pairs batched
        together); ``passages[i]`` are query ``i``'s."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passage lists")
        pairs = [
            (q, pair_text(title, text))
            for q, group in zip(queries, passages, strict=True)
            for title, text in group
        ]
        if not pairs:
            return [np.zeros(0, dtype=np.float32) for _ in queries]
        scores = np.asarray(
            self._load().predict(pairs, batch_size=BATCH_SIZE, show_progress_bar=False), dtype=np.float32
        ).reshape(-1)
        out, at = [], 0
        for group in passages:
            out.append(scores[at : at + len(group)])
            at += len(group)
        return out
