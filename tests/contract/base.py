"""What every contract mixin needs from the backend's test class that combines it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, VectorIndex
from tests.contract.helpers import DIM, MODEL, make_corpus, scratch_dir


class IndexContract:
    """The base of every mixin. A backend's test class provides:

    - :meth:`open_index`: open (creating it when absent) the shard stored at ``path`` for
      ``model`` and ``dim``; opening the same path again reaches the same store;
    - ``exact``: whether unfiltered search equals brute force (False for IVF, HNSW);
    - ``exact_filters``: whether filtered search equals brute force at these tests' sizes.

    In return each test gets ``make`` (opens the test's one shard, at ``shard_path``; closes it
    after the test), ``corpus`` (60 documents, 2 to 8 chunks each) and ``reference`` (the corpus
    in the exact :class:`InMemoryIndex`, the oracle).
    """

    exact: ClassVar[bool] = True
    exact_filters: ClassVar[bool] = True

    def open_index(self, path: Path, model: str, dim: int) -> VectorIndex:
        raise NotImplementedError(f"{type(self).__name__} must say how to open its backend")

    @pytest.fixture
    def shard_path(self) -> Iterator[Path]:
        """Where the test's shard lives: a fresh scratch directory, removed after the test."""
        with scratch_dir() as directory:
            yield directory / "shard-0"

    @pytest.fixture
    def make(self, shard_path: Path) -> Iterator[Callable[..., VectorIndex]]:
        """Opens the test's shard (``model``, ``dim`` as keywords); closes all it opened after."""
        opened: list[VectorIndex] = []

        def _open(model: str = MODEL, dim: int = DIM) -> VectorIndex:
            index = self.open_index(shard_path, model, dim)
            opened.append(index)
            return index

        yield _open
        for index in opened:
            index.close()

    @pytest.fixture(scope="class")
    @classmethod
    def corpus(cls) -> list[ChunkRecord]:
        return make_corpus()

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, corpus: list[ChunkRecord]) -> InMemoryIndex:
        ref = InMemoryIndex(MODEL, DIM)
        ref.upsert(corpus)
        return ref
