"""The /v1/embeddings path without Ray: the token budget, the response bytes in both encodings,
the low-priority worker thread, and the deployment's class on the packaged MiniLM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from actors.embedder import Embedder
from deployments.bulk_embedder import (
    BULK_NICE,
    BulkEmbedder,
    check_budget,
    encode_vector,
    lower_thread_priority,
    response_body,
    thread_nice,
)
from schemas.api import EmbeddingsResponse
from schemas.errors import InvalidRequestError
from schemas.settings import EmbedConfig, EmbeddingsConfig

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _unit_rows(n: int, dim: int) -> np.ndarray:
    rows = np.random.default_rng(7).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- the budget ---------------------------------------------------------------------------------


def test_a_request_at_the_token_budget_passes_with_its_total() -> None:
    assert check_budget([100, 28], limit=128, max_seq_length=256) == 128


def test_a_request_over_the_token_budget_names_the_total_the_limit_and_the_setting() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_budget([100, 29], limit=128, max_seq_length=256)
    message = str(caught.value)
    assert caught.value.param == "input"
    assert "129 tokens" in message and "at most 128" in message
    assert "serve.embeddings.max_request_tokens" in message and "256" in message


# -- the response bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_the_body_is_an_embeddings_response_with_every_vector_in_order(encoding: Any) -> None:
    vectors = _unit_rows(5, 384)
    body = response_body(vectors, encoding, "org/model", tokens=42)
    raw = json.loads(body)
    assert raw["object"] == "list" and [d["object"] for d in raw["data"]] == ["embedding"] * 5
    parsed = EmbeddingsResponse.model_validate_json(body)
    assert [d.index for d in parsed.data] == [0, 1, 2, 3, 4]
    assert parsed.model == "org/model"
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens == 42
    if encoding == "float":
        got = np.array([d.embedding for d in parsed.data], dtype=np.float32)
    else:
        got = np.stack([np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in parsed.data])
    np.testing.assert_array_equal(got, vectors)  # float32 values survive either encoding exactly


def test_base64_is_little_endian_float32_whatever_the_array_byte_order() -> None:
    # 1.0 as float32 is 0x3f800000: little-endian bytes 00 00 80 3f.
    for dtype in ("<f4", ">f4", "<f8"):
        assert encode_vector(np.array([1.0, -2.0], dtype=dtype), "base64") == base64.b64encode(
            b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
        ).decode("ascii")


def test_floats_are_plain_json_numbers() -> None:
    values = encode_vector(np.array([0.5, -0.25], dtype=np.float32), "float")
    assert values == [0.5, -0.25] and all(type(v) is float for v in values)


# -- the worker's priority ------------------------------------------------------------------------


@linux_only
def test_the_worker_thread_is_niced_and_the_caller_is_not() -> None:
    me = threading.get_native_id()
    before = thread_nice(me)
    with ThreadPoolExecutor(1, initializer=lower_thread_priority) as worker:
        tid = worker.submit(threading.get_native_id).result()
        assert thread_nice(tid) == BULK_NICE
        assert worker.submit(lambda: lower_thread_priority(5)).result() is None
        assert thread_nice(tid) == BULK_NICE  # never lowered back
        # A thread the worker starts (a torch or tokenizer pool) inherits its nice value.
        child = worker.submit(_nice_of_a_thread_started_here).result()
        assert child == BULK_NICE
    assert thread_nice(me) == before == os.getpriority(os.PRIO_PROCESS, 0)


def _nice_of_a_thread_started_here() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(thread_nice(threading.get_native_id())))
    thread.start()
    thread.join()
    return seen[0]


# -- the deployment's class, on the real model -------------------------------------------------------

TEXTS = [
    "The Broncos won Super Bowl 50.",
    " ".join(["stream"] * 400),  # past the model's 256 tokens: cut, and counted as 256
    "Warsaw is the capital of Poland.",
    "Größere Texte, émigré, 東京.",
]


@pytest.fixture(scope="module")
def bulk() -> Iterator[Any]:
    import torch

    threads = torch.get_num_threads()
    plain = BulkEmbedder.func_or_class  # the class under @serve.deployment
    yield plain(
        EmbedConfig(model=MODEL, device="cpu", num_cpus=1, max_batch_tokens=512),
        EmbeddingsConfig(max_request_tokens=280),
    )
    torch.set_num_threads(threads)  # torch's thread count is process-wide: leave it as found


@pytest.fixture(scope="module")
def reference() -> Embedder:
    embedder = Embedder(EmbedConfig(model=MODEL, device="cpu"))
    embedder.warm_up()
    return embedder


def test_the_bulk_class_answers_the_vectors_and_tokens_of_the_model(bulk: Any, reference: Embedder) -> None:
    texts = [TEXTS[0], TEXTS[2], TEXTS[3]]
    parsed = EmbeddingsResponse.model_validate_json(asyncio.run(bulk.embed(texts, "float")))
    got = np.array([d.embedding for d in parsed.data], dtype=np.float32)
    np.testing.assert_allclose(got, reference.embed(texts), atol=1e-5)
    assert parsed.usage.total_tokens == sum(reference.count_tokens(texts))
    assert parsed.model == MODEL


def test_the_bulk_class_refuses_a_request_over_its_budget(bulk: Any, reference: Embedder) -> None:
    total = sum(reference.count_tokens(TEXTS))
    assert total > 280
    with pytest.raises(InvalidRequestError, match=rf"{total} tokens .* at most 280 per request \(serve.emb"):
        asyncio.run(bulk.embed(TEXTS, "base64"))


@linux_only
def test_the_bulk_class_computes_on_one_niced_torch_thread(bulk: Any) -> None:
    described = bulk.describe()
    assert described["worker_nice"] == BULK_NICE and described["torch_threads"] == 1
    assert described["model"] == MODEL and described["dim"] == 384
