"""The contract on FaissIndex, one class per structure (flat, IVF, HNSW), each with every mixin:
writes, ledger, search, filters, keyword search (its store's FTS5) and persistence. FaissIndex
specifics beyond the contract: test_faiss_index.py and test_shard_store.py."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

from actors.faiss_index import FaissIndex
from actors.shard_store import DB_NAME, fts_terms
from actors.vector_index import ShardWrite, VectorIndex
from schemas.settings import FaissConfig
from tests.contract.filter import FilterContract
from tests.contract.keyword import DIM as KEYWORD_DIM
from tests.contract.keyword import MODEL as KEYWORD_MODEL
from tests.contract.keyword import TEXTS, KeywordContract, record
from tests.contract.ledger import LedgerContract
from tests.contract.persistence import PersistenceContract
from tests.contract.search import SearchContract
from tests.contract.write import WriteContract


class FaissContract(
    WriteContract, LedgerContract, SearchContract, FilterContract, KeywordContract, PersistenceContract
):
    """Every mixin, on the structure ``config`` builds. ``filter_exact_max`` (4096) exceeds every
    corpus here, so filtered searches are brute force: exact on every structure."""

    config: ClassVar[FaissConfig]

    def open_index(self, path: Path, model: str, dim: int) -> VectorIndex:
        return FaissIndex(path, model, dim, self.config)


# One OpenMP thread: FAISS's thread start-up dwarfs the work at these sizes (100x on small hosts).
class TestFaissFlat(FaissContract):
    config = FaissConfig(kind="flat", omp_threads=1)


class TestFaissIvf(FaissContract):
    # nlist 4 trains at 156 vectors, so the corpus is searched by IVF, approximately
    config = FaissConfig(kind="ivf", ivf_nlist=4, ivf_nprobe=3, omp_threads=1)
    exact = False


class TestFaissHnsw(FaissContract):
    config = FaissConfig(kind="hnsw", hnsw_m=16, omp_threads=1)
    exact = False


def test_a_store_from_before_the_keyword_index_is_indexed_on_open(tmp_path: Path) -> None:
    shard = tmp_path / "shard"
    config = FaissConfig(omp_threads=1)
    idx = FaissIndex(shard, KEYWORD_MODEL, KEYWORD_DIM, config)
    idx.upsert([record(doc, text) for doc, text in TEXTS.items()])
    idx.close()
    conn = sqlite3.connect(shard / DB_NAME)  # make it look like a store written before FTS5
    conn.executescript(
        "DROP TRIGGER chunks_fts_insert; DROP TRIGGER chunks_fts_delete; DROP TABLE chunks_fts;"
        "DELETE FROM meta WHERE key = 'keyword_index';"
    )
    conn.close()
    reopened = FaissIndex(shard, KEYWORD_MODEL, KEYWORD_DIM, config)
    try:
        assert [h.document_id for h in reopened.keyword_search(["eiffel"], 5)[0]] == ["paris"]
        reopened.apply(ShardWrite(delete_documents=["paris"]))
        assert reopened.keyword_search(["eiffel"], 5) == [[]]
    finally:
        reopened.close()


def test_fts_terms_are_distinct_lowercased_words() -> None:
    assert fts_terms('Who "won" Super_Bowl 50? who WON') == ["who", "won", "super_bowl", "50"]


def test_without_faiss_the_faiss_backend_says_what_to_install_and_milvus_serving_still_imports() -> None:
    """FAISS is an extra (``riverbed[cpu]`` or ``riverbed[gpu]``): an install without it fails where
    the faiss backend is used, naming both extras, and a retriever (Milvus-only install) still imports.
    A fresh interpreter, with ``faiss`` made unimportable."""
    probe = textwrap.dedent(
        """
        import sys
        sys.modules["faiss"] = None  # import faiss now raises ModuleNotFoundError
        import deployments.retriever  # the serving path of a Milvus-only install
        try:
            import actors.faiss_index
        except ModuleNotFoundError as exc:
            print(exc.name, "|", exc)
        """
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    name, message = done.stdout.strip().split(" | ", 1)
    assert name == "faiss"
    assert "riverbed[cpu]" in message and "riverbed[gpu]" in message and "milvus" in message
