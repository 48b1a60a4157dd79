"""An in-process :class:`actors.processor.Downstream`: an embedder and index shards in this process.

For tests of the stream consumer against a real broker without Ray (the pipeline's RayDownstream
does the same over actors). Embedding runs synchronously; the returned future is already done
(or already failed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from actors.processor import StoredDocument, merge_stored
from actors.vector_index import DocumentRow, ShardWrite, VectorIndex, WriteResult
from schemas.ids import shard_of


class LocalDownstream:
    def __init__(self, embedder: Any, shards: Sequence[VectorIndex]) -> None:
        self.embedder = embedder
        self.shards = list(shards)
        self.n_shards = len(self.shards)

    def embed(self, texts: list[str]) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        try:
            future.set_result(self.embedder.embed(texts))
        except Exception as exc:  # the consumer classifies it, as it does an actor's
            future.set_exception(exc)
        return future

    def stored(self, document_ids: Sequence[str]) -> dict[str, StoredDocument]:
        rows: dict[str, DocumentRow] = {}
        for doc_id in document_ids:
            rows.update(self.shards[shard_of(doc_id, self.n_shards)].get_document_rows([doc_id]))
        versions = [shard.get_document_versions(document_ids) for shard in self.shards]
        return merge_stored(document_ids, rows, versions)

    def write(self, writes: Mapping[int, ShardWrite]) -> dict[int, WriteResult]:
        return {shard: self.shards[shard].apply(write) for shard, write in writes.items()}
