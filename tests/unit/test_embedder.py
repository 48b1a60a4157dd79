"""Embedder on the packaged MiniLM (CPU, fp32) against SentenceTransformer.encode, and the
HashEmbedder test helper; the contract tests run on both."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from actors.embedder import DEFAULT_BATCH_LIMITS, Embedder, TextEmbedder, cpu_threads
from actors.testing.hash_embedder import HashEmbedder
from schemas.errors import ConfigError
from schemas.settings import EmbedConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Mixed lengths on purpose: short and long interleaved, duplicates, an empty text, one past the
# model's 256 tokens (truncated), non-ASCII.
TEXTS = [
    "Kafka partitions keep one key's records in order.",
    " ".join(["stream"] * 400),
    "",
    "Ray actors embed chunks in batches sized by a token budget.",
    "FAISS shards hold the vectors; SQLite holds the text.",
    "Kafka partitions keep one key's records in order.",
    "Größere Texte, émigré, 東京, and emoji 🚀 mixed in.",
    " ".join(f"word{i}" for i in range(90)),
    "short",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    e = Embedder(EmbedConfig(model=MODEL, device="cpu"))
    e.warm_up()
    return e


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    from actors.models import resolve_model

    return SentenceTransformer(resolve_model(MODEL).location, device="cpu")


@pytest.fixture(params=["hash", "minilm"])
def any_embedder(request: pytest.FixtureRequest) -> Iterator[TextEmbedder]:
    if request.param == "hash":
        yield HashEmbedder(dim=32)
    else:
        yield request.getfixturevalue("embedder")


# -- contract, on both --------------------------------------------------------------------------


def test_contract_shape_dtype_norm_order(any_embedder: TextEmbedder) -> None:
    any_embedder.warm_up()
    vectors = any_embedder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), any_embedder.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Row i is texts[i]: each row equals the text embedded alone, duplicates alike.
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(vectors[i], any_embedder.embed([text])[0], atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[5])


def test_contract_empty_input(any_embedder: TextEmbedder) -> None:
    out = any_embedder.embed([])
    assert out.shape == (0, any_embedder.dim)
    assert out.dtype == np.float32
    assert any_embedder.count_tokens([]) == []


@pytest.mark.parametrize("bad", [["ok", 3], ["ok", None], [b"bytes"], "a bare string"])
def test_contract_rejects_non_str(any_embedder: TextEmbedder, bad: object) -> None:
    with pytest.raises(ValueError):
        any_embedder.embed(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        any_embedder.count_tokens(bad)  # type: ignore[arg-type]


def test_contract_token_counts_truncate_at_max_seq_length(any_embedder: TextEmbedder) -> None:
    counts = any_embedder.count_tokens(TEXTS)
    assert len(counts) == len(TEXTS)
    assert counts[1] == any_embedder.max_seq_length  # 400 words, truncated
    assert counts[2] == 2  # the empty text: the two specials
    assert all(2 <= c <= any_embedder.max_seq_length for c in counts)


def test_contract_similar_texts_are_closer(any_embedder: TextEmbedder) -> None:
    a, b, c = any_embedder.embed(
        [
            "the shard stores vectors and text on disk",
            "the shard stores vectors on disk",
            "bananas ripen quickly in warm kitchens",
        ]
    )
    assert float(a @ b) > float(a @ c)


# -- the real model -----------------------------------------------------------------------------


def test_describes_itself(embedder: Embedder) -> None:
    assert embedder.model_name == MODEL
    assert embedder.dim == 384
    assert embedder.device == "cpu"
    assert embedder.max_seq_length == 256


def test_matches_sentence_transformers_encode(embedder: Embedder, reference: SentenceTransformer) -> None:
    want = reference.encode(TEXTS, normalize_embeddings=True)
    got = embedder.embed(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(np.min(np.sum(got * want, axis=1))) > 1 - 1e-5


def test_token_counts_match_the_model_tokenizer(embedder: Embedder, reference: SentenceTransformer) -> None:
    tokenizer = reference.tokenizer
    want = [min(len(tokenizer(t)["input_ids"]), 256) for t in TEXTS]
    assert embedder.count_tokens(TEXTS) == want


def test_tiny_batches_give_the_same_vectors(embedder: Embedder, reference: SentenceTransformer) -> None:
    # A budget below the longest text: oversize batches of one, many small batches, scattering.
    small = Embedder(EmbedConfig(model=MODEL, device="cpu", max_batch_tokens=64, max_batch_size=3))
    many = TEXTS * 3
    want = reference.encode(many, normalize_embeddings=True)
    np.testing.assert_allclose(small.embed(many), want, atol=1e-4)


def test_encode_fallback_gives_the_same_vectors(embedder: Embedder, reference: SentenceTransformer) -> None:
    # Models whose input step is more than tokenizing take encode per planned batch.
    fallback = Embedder(EmbedConfig(model=MODEL, device="cpu", max_batch_tokens=512))
    fallback._loaded = dataclasses.replace(embedder._load(), direct=False)
    want = reference.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(fallback.embed(TEXTS), want, atol=1e-4)


def test_batch_limits_default_per_device_and_config_wins(embedder: Embedder) -> None:
    assert embedder.batch_limits == DEFAULT_BATCH_LIMITS["cpu"]
    assert Embedder(EmbedConfig(model=MODEL, device="cpu", max_batch_tokens=999)).batch_limits == (
        999,
        DEFAULT_BATCH_LIMITS["cpu"][1],
    )


def test_warm_up_is_idempotent(embedder: Embedder) -> None:
    loaded = embedder._load()
    embedder.warm_up()
    assert embedder._load() is loaded


def test_init_is_cheap_and_members_warm_up_on_use() -> None:
    lazy = Embedder(EmbedConfig(model=MODEL, device="cpu"))
    assert lazy._loaded is None
    assert lazy.model_name == MODEL  # needs no model
    assert lazy._loaded is None
    assert lazy.dim == 384
    assert lazy._loaded is not None


def test_cuda_requested_without_cuda_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda"):
        Embedder(EmbedConfig(model=MODEL, device="cuda")).warm_up()


def test_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be loaded"):
        Embedder(EmbedConfig(model=str(tmp_path), device="cpu")).warm_up()


def test_cpu_threads_follow_num_cpus() -> None:
    assert cpu_threads(3.0) == 3
    assert cpu_threads(0.5) == 1  # a fractional CPU still needs one thread
    assert cpu_threads(None) >= 1


# -- the hash embedder ----------------------------------------------------------------------------


def test_hash_embedder_is_deterministic_and_bag_of_words() -> None:
    h = HashEmbedder(dim=32)
    assert h.model_name == "riverbed/hash-embedder"
    a = h.embed(["Hello world, hello!"])
    np.testing.assert_array_equal(a, HashEmbedder(dim=32).embed(["Hello world, hello!"]))
    # Case, punctuation and word order do not matter: a bag of lower-cased words.
    np.testing.assert_array_equal(a, h.embed(["hello HELLO world"]))
    assert h.embed(["x"]).shape == (1, 32)
    assert HashEmbedder(dim=8).embed(["x", "y"]).shape == (2, 8)


def test_hash_embedder_counts_words_plus_specials() -> None:
    h = HashEmbedder(max_seq_length=10)
    assert h.count_tokens(["one two three", "", " ".join(["w"] * 50)]) == [5, 2, 10]
    # Words past max_seq_length do not change the vector, as with a truncating tokenizer.
    np.testing.assert_array_equal(h.embed([" ".join(["w"] * 8) + " extra"]), h.embed([" ".join(["w"] * 8)]))


def test_hash_embedder_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        HashEmbedder(dim=0)
    with pytest.raises(ValueError):
        HashEmbedder(max_seq_length=2)
