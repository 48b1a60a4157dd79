"""Index backends: the stores a shard can be built on, chosen by ``index.backend``.

A backend fills every role of a shard's contract (:mod:`actors.vector_index`): the ledger (chunk
rows, document rows, versions, applied offsets), the vector structure and the keyword index. Each
backend here is two things:

- :meth:`Backend.open` builds the shard's store (:class:`ShardBackend`), creating it when absent;
- :meth:`Backend.stored_state` reads what a store holds (model, dim, applied offsets, counts)
  without creating or changing it: the committed-offsets check runs on it before a shard opens,
  and `riverbed stats` when no shard actor is running.

``faiss``: a FAISS structure plus a SQLite store in the shard's directory (node-local). ``milvus``:
Milvus Lite in the shard's directory (node-local, one process per data dir), or a Milvus server
(``index.milvus.uri``), which keeps nothing on the node: a shard restarts anywhere.

Every other module reaches a store only through this one (never its files), so a backend joins
by adding a :class:`Backend` to :data:`BACKENDS` and passing the contract tests.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from actors.vector_index import KeywordSearch, VectorIndex
from schemas.errors import ConfigError
from schemas.settings import IndexConfig
from schemas.topology import Offsets


@runtime_checkable
class ShardBackend(VectorIndex, KeywordSearch, Protocol):
    """A shard's store: the vector index contract, keyword search, and an identity."""

    @property
    def store_id(self) -> str:
        """Made when the store was created; a store created again has another."""
        ...

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """The store's quota in bytes (None: none); a backend without quotas refuses a number."""
        ...


@dataclass(frozen=True)
class StoredState:
    """What an existing store holds, read without changing it.

    ``applied``: the Kafka offsets its durable writes cover. ``complete``: whether ``applied`` can
    be trusted to cover everything committed (a FAISS store of schema 1 did not record every
    batch: see :func:`actors.shard_identity.offsets_complete`).
    """

    model: str
    dim: int
    applied: Offsets
    complete: bool
    chunks: int
    documents: int


class Backend(Protocol):
    name: str

    def node_local(self, config: IndexConfig) -> bool:
        """Whether the store lives in the shard's directory, on one node (then the shard restarts
        only where it is); False for a store a shard reaches from any node."""
        ...

    def open(
        self, config: IndexConfig, path: Path, model: str, dim: int, *, index_name: str, shard: int
    ) -> ShardBackend: ...

    def stored_state(
        self, config: IndexConfig, path: Path, *, index_name: str, shard: int
    ) -> StoredState | None:
        """None when there is no store yet. Raises :class:`StoreUnreadableError` when one exists
        but cannot be read."""
        ...

    def drop(self, config: IndexConfig, path: Path, *, index_name: str, shard: int) -> None:
        """Deletes the shard's store and everything in ``path`` (a throwaway index); nothing when
        there is none. The shard must be closed."""
        ...


class StoreUnreadableError(Exception):
    """A store exists but cannot be read (corrupt, locked by another process, server down)."""


class FaissBackend:
    name = "faiss"

    def node_local(self, config: IndexConfig) -> bool:
        return True

    def open(
        self, config: IndexConfig, path: Path, model: str, dim: int, *, index_name: str, shard: int
    ) -> ShardBackend:
        from actors.faiss_index import FaissIndex

        return FaissIndex(path, model, dim, config.faiss, max_bytes=config.max_shard_bytes)

    def stored_state(
        self, config: IndexConfig, path: Path, *, index_name: str, shard: int
    ) -> StoredState | None:
        from actors.shard_identity import applied_offsets, offsets_complete
        from actors.shard_store import DB_NAME, ShardStore

        store_file = path / DB_NAME
        try:
            applied = applied_offsets(store_file)
            if applied is None:
                return None
            store = ShardStore.read_only(path)
            try:
                model, dim, chunks, documents = store.model, store.dim, store.count(), store.document_count()
            finally:
                store.close()
            return StoredState(model, dim, applied, offsets_complete(store_file), chunks, documents)
        except sqlite3.DatabaseError as exc:
            raise StoreUnreadableError(f"cannot read the store {store_file}: {exc}") from exc

    def drop(self, config: IndexConfig, path: Path, *, index_name: str, shard: int) -> None:
        shutil.rmtree(path, ignore_errors=True)


class MilvusBackend:
    name = "milvus"

    def node_local(self, config: IndexConfig) -> bool:
        return config.milvus.uri is None

    def open(
        self, config: IndexConfig, path: Path, model: str, dim: int, *, index_name: str, shard: int
    ) -> ShardBackend:
        from actors.milvus_index import MilvusIndex

        return MilvusIndex(path, model, dim, config.milvus, index_name=index_name, shard=shard)

    def stored_state(
        self, config: IndexConfig, path: Path, *, index_name: str, shard: int
    ) -> StoredState | None:
        from actors.milvus_index import stored_state

        return stored_state(path, config.milvus, index_name=index_name, shard=shard)

    def drop(self, config: IndexConfig, path: Path, *, index_name: str, shard: int) -> None:
        from actors.milvus_index import drop_store

        if config.milvus.uri is not None:
            drop_store(path, config.milvus, index_name=index_name, shard=shard)
        shutil.rmtree(path, ignore_errors=True)  # Milvus Lite's data dir, or nothing on a server


BACKENDS: dict[str, Backend] = {b.name: b for b in (FaissBackend(), MilvusBackend())}


def backend_for(config: IndexConfig) -> Backend:
    """The backend ``index.backend`` names."""
    try:
        return BACKENDS[config.backend]
    except KeyError:
        raise ConfigError(
            f"index.backend {config.backend!r} is not one of {', '.join(sorted(BACKENDS))}"
        ) from None
