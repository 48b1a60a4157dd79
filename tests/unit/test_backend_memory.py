"""The contract on InMemoryIndex, the reference the other backends are compared with: writes,
ledger, search and filters (it has no keyword search and keeps nothing on disk)."""

from __future__ import annotations

from pathlib import Path

from actors.testing import InMemoryIndex
from actors.vector_index import VectorIndex
from tests.contract.filter import FilterContract
from tests.contract.ledger import LedgerContract
from tests.contract.search import SearchContract
from tests.contract.write import WriteContract


class TestMemory(WriteContract, LedgerContract, SearchContract, FilterContract):
    def open_index(self, path: Path, model: str, dim: int) -> VectorIndex:
        return InMemoryIndex(model, dim)
