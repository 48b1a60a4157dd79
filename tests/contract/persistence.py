"""Persistence: a reopened shard holds everything written (chunks, rows, offsets, search results),
a shard refuses another model or dim, and a write survives the process dying right after
``apply`` returns. Needs :class:`~tests.contract.base.IndexContract`'s ``open_index`` on a store
that a second opening of the same path (in this process or another) reaches again, and a test
class that pickles (the crash case opens the shard in a child process through it)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from actors.vector_index import ChunkRecord, DocumentRow, ShardWrite, VectorIndex
from schemas.errors import ConfigError
from schemas.filters import MetadataFilter
from tests.contract.base import IndexContract
from tests.contract.helpers import assert_same_hits, make_corpus, unit

REPO = Path(__file__).resolve().parents[2]

# Opens the shard through the pickled test class, writes, and dies without closing anything: no
# close, no snapshot, no atexit, as if the process were killed.
_CRASH = """
import os, pickle, sys
from pathlib import Path
from actors.vector_index import DocumentRow, ShardWrite
from tests.contract.helpers import DIM, MODEL, make_corpus
contract = pickle.loads(bytes.fromhex(sys.argv[1]))
index = contract.open_index(Path(sys.argv[2]), MODEL, DIM)
index.apply(ShardWrite(upserts=make_corpus(seed=11, n_docs=20), documents={"doc-3": DocumentRow("h", 4)},
                       offsets={"docs": {0: 77}}))
os._exit(9)
"""


class PersistenceContract(IndexContract):
    def test_reopen_keeps_everything(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        index = make()
        index.apply(
            ShardWrite(upserts=corpus, documents={"doc-1": DocumentRow("h", 4)}, offsets={"docs": {3: 42}})
        )
        index.delete([corpus[4].chunk_id])
        queries = unit(np.random.default_rng(5), 4)
        before = (index.search(queries, 10), index.search(queries, 10, MetadataFilter.parse({"lang": "en"})))
        index.close()
        reopened = make()
        assert reopened.count() == len(corpus) - 1
        assert reopened.get([r.chunk_id for r in corpus]) == [
            None if i == 4 else r for i, r in enumerate(corpus)
        ]
        assert reopened.offsets() == {"docs": {3: 42}}
        assert reopened.get_document_hashes(["doc-1"]) == {"doc-1": "h"}
        after = (
            reopened.search(queries, 10),
            reopened.search(queries, 10, MetadataFilter.parse({"lang": "en"})),
        )
        if self.exact_filters:
            assert_same_hits(after[1], before[1])
        if self.exact:  # an approximate structure rebuilt from the store may be trained anew
            assert_same_hits(after[0], before[0])

    def test_other_model_or_dim_is_refused(
        self, make: Callable[..., VectorIndex], corpus: list[ChunkRecord]
    ) -> None:
        first = make()
        first.upsert(corpus[:3])
        first.close()
        with pytest.raises(
            ConfigError, match=r"model 'test/model-a' \(dim 32\).*model 'test/model-b' \(dim 32\)"
        ):
            make(model="test/model-b")
        with pytest.raises(ConfigError, match=r"\(dim 32\).*\(dim 16\)"):
            make(dim=16)
        assert make().count() == 3  # a refused open leaves the shard intact and unlocked

    def test_a_write_survives_a_crash_right_after_apply(
        self, make: Callable[..., VectorIndex], shard_path: Path
    ) -> None:
        done = subprocess.run(
            [sys.executable, "-c", _CRASH, pickle.dumps(self).hex(), str(shard_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 9, done.stderr[-2000:]
        index = make()  # the dead process's lock is gone with it
        corpus = make_corpus(seed=11, n_docs=20)
        assert index.count() == len(corpus) and index.offsets() == {"docs": {0: 77}}
        assert index.get([r.chunk_id for r in corpus]) == corpus
        assert index.get_document_rows(["doc-3"]) == {"doc-3": DocumentRow("h", 4)}
        [[top]] = index.search(corpus[7].vector[None], 1)
        assert top.chunk_id == corpus[7].chunk_id
