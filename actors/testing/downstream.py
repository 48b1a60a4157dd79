"""An in-process :class:`actors.source.Downstream`: an embedder and index shards in this process.

For tests of the source against a real broker without Ray (the pipeline's RayDownstream does the
same over actors). Embedding runs synchronously; the returned future is already done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from actors.vector_index import DocumentRow, ShardWrite, VectorIndex
from schemas.ids import shard_of


class LocalDownstream:
    def __init__(self, embedder: Any, shards: Sequence[VectorIndex]) -> None:
        self.embedder = embedder
        self.shards = list(shards)
        self.n_shards = len(self.shards)

    def embed(self, texts: list[str]) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        future.set_result(self.embedder.embed(texts))
        return future

    def document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        rows: dict[str, DocumentRow] = {}
        for doc_id in document_ids:
            rows.update(self.shards[shard_of(doc_id, self.n_shards)].get_document_rows([doc_id]))
        return rows

    def write(self, writes: Mapping[int, ShardWrite]) -> None:
        for shard, write in writes.items():
            self.shards[shard].apply(write)
