"""Embedder on CUDA in fp16 against SentenceTransformer.encode in fp32 on the same device."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest

from actors.embedder import Embedder
from schemas.settings import EmbedConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# A GPU machine may lack the packaged model: scripts/gpu-check.sh points this at a carried copy.
MODEL = os.environ.get("RIVERBED_TEST_MODEL", "sentence-transformers/all-MiniLM-L6-v2")
TEXTS = [
    "Kafka partitions keep one key's records in order.",
    " ".join(["stream"] * 400),
    "",
    "Ray actors embed chunks in batches sized by a token budget.",
    "Größere Texte, émigré, 東京, and emoji 🚀 mixed in.",
    *(" ".join(f"word{j}" for j in range(i)) for i in range(1, 300, 7)),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    e = Embedder(EmbedConfig(model=MODEL, device="auto", max_batch_tokens=2048))
    e.warm_up()
    return e


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    from actors.models import resolve_model

    return SentenceTransformer(resolve_model(MODEL).location, device="cuda")


def test_auto_picks_cuda_in_fp16(embedder: Embedder) -> None:
    assert embedder.device == "cuda"
    assert next(embedder._load().model.parameters()).dtype == torch.float16
    assert embedder.batch_limits == (2048, 512)  # the configured budget, CUDA's default size


def test_fp16_matches_fp32_encode(embedder: Embedder, reference: SentenceTransformer) -> None:
    want = reference.encode(TEXTS, normalize_embeddings=True)
    got = embedder.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # fp16 rounding: cosine to the fp32 vectors stays above 0.999, elements within 1e-2.
    assert float(np.min(np.sum(got * want, axis=1))) > 0.999
    np.testing.assert_allclose(got, want, atol=1e-2)
    # Row order: each row is its text embedded alone.
    for i in (0, 1, 2, len(TEXTS) - 1):
        np.testing.assert_allclose(got[i], embedder.embed([TEXTS[i]])[0], atol=2e-3)


def test_empty_input_on_cuda(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, 384)
