"""QueryEmbedder deployment: queries in, unit vectors out, batched across concurrent requests.

Requests that arrive within ``search.embed_batch_wait_s`` of each other share one forward pass
(``@serve.batch``, up to ``search.embed_batch_size``), which is what keeps throughput up under
many clients. The forward pass runs on a worker thread, so the replica keeps accepting (and
batching) requests while the model works. Only single queries come here (search, RAG):
``/v1/embeddings`` has its own deployment, :class:`deployments.bulk_embedder.BulkEmbedder`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from actors.embedder import Embedder
from schemas.settings import EmbedConfig, SearchConfig


@serve.deployment
class QueryEmbedder:
    def __init__(self, config: EmbedConfig, search: SearchConfig) -> None:
        self.embedder = Embedder(config)
        self.embedder.warm_up()
        batcher: Any = self.embed  # serve.batch's wrapper carries the setters
        batcher.set_max_batch_size(search.embed_batch_size)
        batcher.set_batch_wait_timeout_s(search.embed_batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        """One vector (``(dim,)`` float32, unit norm) per text; callers pass ONE text each."""
        vectors = await asyncio.to_thread(self.embedder.embed, texts)
        return list(vectors)

    def describe(self) -> dict[str, Any]:
        return {"model": self.embedder.model_name, "dim": self.embedder.dim, "device": self.embedder.device}
