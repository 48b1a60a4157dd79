"""BulkEmbedder deployment: ``POST /v1/embeddings`` requests, apart from search queries.

Search and RAG embed one query per request in the retriever's shared batches; a bulk
request (up to ``serve.embeddings.max_inputs`` texts) would hold those batches for seconds. Here
each request is served on its own replica (``serve.bulk_embedder``), in three steps:

- BUDGET: its tokens are counted first (the model's tokenizer, each text cut at the model's
  length); over ``serve.embeddings.max_request_tokens`` it is refused with
  :class:`InvalidRequestError` (HTTP 400) before any forward pass.
- EMBED: the embedder's own planning cuts it into forward passes of at most ``max_batch_tokens``
  padded tokens.
- BODY: the response is built here, as the JSON bytes of ``EmbeddingsResponse``, so the ingress
  only passes them on (serialising thousands of vectors would otherwise run on its event loop).

All three run on one worker thread whose nice value is raised to :data:`BULK_NICE` (Linux keeps a
nice value per thread): when bulk embedding and the retriever's query embedding want the same core,
the kernel gives it to the queries. Its torch work stays on that thread: with one torch thread
(``serve.embedder_threads``' default) torch computes in the calling thread, and any thread pool
torch or the tokenizer starts is started from it, so it inherits the nice value. The event loop
and Ray's own threads keep theirs, so the replica still answers health checks and routing.
Requests run one at a time, in arrival order.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from ray import serve

from actors.embedder import Embedder
from schemas.api import EmbeddingData, EmbeddingsResponse, EmbeddingsUsage
from schemas.errors import InvalidRequestError
from schemas.settings import EmbedConfig, EmbeddingsConfig

log = logging.getLogger(__name__)

BULK_NICE = 19
"""Nice value of the worker thread: the lowest priority, so that it runs on what the rest of the
app leaves. It only matters when CPUs are contended; on an idle machine bulk runs at full speed."""

Encoding = Literal["float", "base64"]


def check_budget(tokens: list[int], limit: int, max_seq_length: int) -> int:
    """The request's total tokens, or :class:`InvalidRequestError` (``param`` ``input``) naming
    the total, the limit and its setting when the total is over ``limit``."""
    total = sum(tokens)
    if total > limit:
        raise InvalidRequestError(
            f"input has {total} tokens (the model's tokenizer, each input cut at {max_seq_length}); "
            f"at most {limit} per request (serve.embeddings.max_request_tokens): split it into "
            "smaller requests",
            "input",
        )
    return total


def encode_vector(vector: np.ndarray, encoding: Encoding) -> list[float] | str:
    """One vector as OpenAI's API writes it: a list of floats, or for ``base64`` the base64 of its
    little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    values: list[float] = np.asarray(vector, dtype=np.float32).tolist()
    return values


def response_body(vectors: np.ndarray, encoding: Encoding, model: str, tokens: int) -> bytes:
    """The JSON of an ``EmbeddingsResponse``: row ``i`` of ``vectors`` as item ``i`` of ``data``;
    ``tokens`` as both prompt and total tokens."""
    response = EmbeddingsResponse(
        data=[EmbeddingData(index=i, embedding=encode_vector(v, encoding)) for i, v in enumerate(vectors)],
        model=model,
        usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
    return response.model_dump_json().encode("utf-8")


def lower_thread_priority(nice: int = BULK_NICE) -> None:
    """Raises the calling thread's nice value to ``nice`` (never lowers it). Linux only: there a
    nice value belongs to a thread; elsewhere it belongs to the process, which is left alone."""
    if not sys.platform.startswith("linux"):
        log.warning("bulk embedding runs at normal priority: per-thread nice values are Linux-only")
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # a sandbox that forbids it: slower queries under load, still correct
        log.warning("bulk embedding runs at normal priority: cannot set its nice value: %s", exc)


def thread_nice(tid: int) -> int:
    """The nice value of thread ``tid`` of this process (Linux: a native thread id)."""
    return os.getpriority(os.PRIO_PROCESS, tid)


@serve.deployment
class BulkEmbedder:
    """Embeds whole ``/v1/embeddings`` requests under the token budget of ``budget``; see the
    module docstring for how it stays out of the queries' way."""

    def __init__(self, config: EmbedConfig, budget: EmbeddingsConfig) -> None:
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="riverbed-bulk-embed", initializer=lower_thread_priority
        )
        self._worker_tid = self._worker.submit(threading.get_native_id).result()
        self.embedder = Embedder(config)
        # Loaded on the worker: torch's thread count is set per thread, and pools start from it.
        self._torch_threads = self._worker.submit(self._warm_up).result()
        self.max_request_tokens = budget.max_request_tokens

    def _warm_up(self) -> int:
        """Loads the model; the torch threads of the calling thread (the worker's)."""
        import torch

        self.embedder.warm_up()
        return torch.get_num_threads()

    async def embed(self, texts: list[str], encoding: Encoding) -> bytes:
        """The JSON bytes of the ``EmbeddingsResponse`` for ``texts`` (validated by the caller:
        non-empty strings, at most ``serve.embeddings.max_inputs``). InvalidRequestError when
        over the token budget."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._respond, texts, encoding)

    def _respond(self, texts: list[str], encoding: Encoding) -> bytes:
        embedder = self.embedder
        tokens = check_budget(embedder.count_tokens(texts), self.max_request_tokens, embedder.max_seq_length)
        return response_body(embedder.embed(texts), encoding, embedder.model_name, tokens)

    def describe(self) -> dict[str, Any]:
        """The model, and how the replica runs it: the worker's torch threads and nice value."""
        return {
            "model": self.embedder.model_name,
            "dim": self.embedder.dim,
            "device": self.embedder.device,
            "torch_threads": self._torch_threads,
            "worker_nice": thread_nice(self._worker_tid),
        }
