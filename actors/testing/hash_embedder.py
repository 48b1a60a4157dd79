"""A deterministic bag-of-words embedder for unit tests: numpy and hashlib only, no model files.

It has the public surface of :class:`actors.embedder.Embedder` (``model_name``, ``dim``,
``device``, ``max_seq_length``, ``warm_up``, ``count_tokens``, ``embed``), so the chunker, shards
and pipeline can be unit-tested without torch. It is no stand-in for the real model's quality:
the integration tests use the real one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from actors.embedder import check_texts

_WORD = re.compile(r"\w+")
# Every text gets a unit vector, even one without words, which hashes this token instead.
_EMPTY_TOKEN = "\x00empty"
# Counted like a BERT tokenizer's [CLS] and [SEP], so token budgets mean the same as with a model.
_SPECIAL_TOKENS = 2


class HashEmbedder:
    """Each lower-cased word (``\\w+``) adds ±1 to the bucket picked by its blake2b hash; the sum
    is L2-normalised. Texts sharing words get close vectors (cosine = overlap of their bags of
    words, up to collisions); the same text gets the same vector in every process and run.

    Tokens: one per word plus two specials, truncated at ``max_seq_length`` like the model's
    tokenizer; words past the limit do not count in the vector either. Thread-safe (stateless).
    """

    model_name = "riverbed/hash-embedder"

    def __init__(self, dim: int = 32, max_seq_length: int = 256) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if max_seq_length <= _SPECIAL_TOKENS:
            raise ValueError(f"max_seq_length must exceed {_SPECIAL_TOKENS}, got {max_seq_length}")
        self._dim = dim
        self._max_seq_length = max_seq_length

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return self._dim

    @property
    def device(self) -> str:
        """Always ``"cpu"``."""
        return "cpu"

    @property
    def max_seq_length(self) -> int:
        """Tokens read per text, the two specials included."""
        return self._max_seq_length

    def warm_up(self) -> None:
        """Nothing to load; present for the :class:`actors.embedder.TextEmbedder` surface."""

    def _words(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())[: self._max_seq_length - _SPECIAL_TOKENS]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Words plus two specials per text, at most :attr:`max_seq_length`; in input order."""
        return [len(self._words(text)) + _SPECIAL_TOKENS for text in check_texts(texts)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors, row ``i`` for ``texts[i]``; ``[]`` gives
        ``(0, dim)``. ValueError if an item is not a ``str``."""
        items = check_texts(texts)
        out = np.zeros((len(items), self._dim), dtype=np.float32)
        for row, text in enumerate(items):
            for word in self._words(text) or [_EMPTY_TOKEN]:
                digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
                # Low bits pick the bucket, the top bit the sign: signed buckets keep collisions
                # from adding up to a bias shared by all vectors.
                out[row, digest % self._dim] += 1.0 if digest >> 63 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        # A bag whose ±1s cancel out exactly has norm 0: fall back to the empty-text vector.
        zero = norms[:, 0] == 0
        if zero.any():
            out[zero] = self.embed([""])[0]
            norms[zero] = 1.0
        out /= norms
        return out
