"""The contract on MilvusIndex, with every mixin (writes, ledger, search, filters, keyword search,
persistence), reached both ways a shard reaches Milvus: Milvus Lite embedded in the shard directory,
and a Milvus server by uri (here Milvus Lite served over gRPC in a thread, started once for this
module). Milvus specifics beyond the contract: test_milvus_index.py and test_milvus_filters.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.milvus_index import MilvusIndex
from actors.vector_index import VectorIndex
from schemas.settings import MilvusConfig
from tests.contract.filter import FilterContract
from tests.contract.helpers import milvus_grpc_server
from tests.contract.keyword import KeywordContract
from tests.contract.ledger import LedgerContract
from tests.contract.persistence import PersistenceContract
from tests.contract.search import SearchContract
from tests.contract.write import WriteContract


class MilvusContract(
    WriteContract, LedgerContract, SearchContract, FilterContract, KeywordContract, PersistenceContract
):
    """Every mixin; the default index type (FLAT) is exact, filtered or not."""


class TestMilvusLite(MilvusContract):
    def open_index(self, path: Path, model: str, dim: int) -> VectorIndex:
        return MilvusIndex(path, model, dim, MilvusConfig())


@pytest.fixture(scope="module")
def milvus_server() -> Iterator[str]:
    """Milvus Lite served over gRPC on a free port, as a Milvus server is reached (by uri)."""
    with milvus_grpc_server() as uri:
        yield uri


class TestMilvusUri(MilvusContract):
    """All tests share one server: each shard's collections are named after its (scratch) path,
    so every test has its own and a reopening of the same path finds them again."""

    uri: str

    @pytest.fixture(autouse=True)
    def _server(self, milvus_server: str) -> None:
        self.uri = milvus_server

    def open_index(self, path: Path, model: str, dim: int) -> VectorIndex:
        prefix = "t" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
        return MilvusIndex(path, model, dim, MilvusConfig(uri=self.uri, collection_prefix=prefix))
