"""IndexShard: the store identity, the committed-offsets check, health and O(1) stats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.index_shard import IndexShard
from actors.shard_identity import IDENTITY_NAME, offsets_behind
from actors.shard_store import DB_NAME, ShardStore
from actors.vector_index import DocumentRow, ShardWrite
from schemas.errors import IndexUnavailableError, StorageFullError
from schemas.settings import FaissConfig, IndexConfig
from schemas.topology import shard_directory
from tests.contract.helpers import DIM, MODEL, make_corpus, scratch_dir

CONFIG = IndexConfig(faiss=FaissConfig(kind="flat", omp_threads=1))


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with scratch_dir() as directory:
        yield directory


def open_shard(data_dir: Path, shard: int = 1, **kw: object) -> IndexShard:
    config = kw.pop("config", CONFIG)
    index_shard = IndexShard(config, data_dir, shard, MODEL, DIM, index_name="wiki", **kw)  # type: ignore[arg-type]
    index_shard.warm_up()
    return index_shard


# -- identity and the committed offsets -------------------------------------------------------


def test_a_fresh_shard_with_nothing_committed_opens_and_records_its_identity(data_dir: Path) -> None:
    shard = open_shard(data_dir, committed={})
    identity = json.loads((shard.path / IDENTITY_NAME).read_text())
    assert {k: identity[k] for k in ("index", "shard", "model", "dim")} == {
        "index": "wiki", "shard": 1, "model": MODEL, "dim": DIM,
    }  # fmt: skip
    assert identity["store_id"] == shard.index.store_id and identity["host"] and identity["created"]
    assert shard.health()["status"] == "ok"
    shard.close()
    again = open_shard(data_dir, committed={"docs": {0: 0}})  # reopened: the same identity
    assert json.loads((again.path / IDENTITY_NAME).read_text()) == identity
    again.close()


def test_a_fresh_shard_behind_the_committed_offsets_is_unavailable(data_dir: Path) -> None:
    shard = open_shard(data_dir, committed={"docs": {0: 5, 1: 0}})
    path = shard_directory(data_dir, 1)
    assert not (path / DB_NAME).exists()  # no empty store was created
    health = shard.health()
    assert (health["status"], health["chunks"], health["vectors"]) == ("unavailable", None, None)
    problem = health["problem"]
    assert "shard 1 of index 'wiki'" in problem and str(path) in problem and "holds no store" in problem
    assert '{"docs": {"0": 5, "1": 0}}' in problem and "Start the shard on the node" in problem
    calls = (
        lambda: shard.apply(ShardWrite(offsets={"docs": {0: 6}})),
        lambda: shard.search(make_corpus()[0].vector[None], 3),
        lambda: shard.keyword_search(["x"], 3),
        shard.stats,
        lambda: shard.get_document_versions(["d"]),
    )
    for call in calls:
        with pytest.raises(IndexUnavailableError, match="holds no store"):
            call()
    assert not (path / DB_NAME).exists()
    shard.close()


def test_an_existing_store_opens_when_it_applied_what_was_committed(data_dir: Path) -> None:
    first = open_shard(data_dir)
    first.apply(ShardWrite(upserts=make_corpus()[:5], offsets={"docs": {0: 7, 1: 3}}))
    first.close()
    shard = open_shard(data_dir, committed={"docs": {0: 7, 1: 2}})
    assert shard.health()["status"] == "ok" and shard.count() == 5
    shard.close()
    behind = open_shard(data_dir, committed={"docs": {0: 8}, "other": {0: 1}})
    problem = behind.health()["problem"]
    assert behind.health()["status"] == "unavailable"
    assert 'applied offsets {"docs": {"0": 7, "1": 3}}' in problem
    assert 'ahead on {"docs": {"0": 8}, "other": {"0": 1}}' in problem
    behind.close()


def test_unchecked_when_the_committed_offsets_are_unknown(data_dir: Path) -> None:
    shard = open_shard(data_dir, committed=None)
    assert shard.health()["status"] == "ok"
    shard.close()


def test_a_directory_of_another_shard_is_refused(data_dir: Path) -> None:
    open_shard(data_dir, shard=1).close()
    path = shard_directory(data_dir, 1)
    path.rename(shard_directory(data_dir, 2))  # moved by hand
    moved = open_shard(data_dir, shard=2)
    assert moved.health()["status"] == "unavailable"
    assert "holds shard 1 of index 'wiki'" in moved.health()["problem"]
    moved.close()


def test_offsets_behind() -> None:
    applied = {"docs": {0: 5, 1: 9}}
    assert offsets_behind(applied, {"docs": {0: 5, 1: 3}}) == {}
    assert offsets_behind(applied, {"docs": {0: 6, 2: 1}, "x": {0: 0}}) == {"docs": {0: 6, 2: 1}}


# -- health and stats -------------------------------------------------------------------------


def test_disk_full_degrades_health_until_a_write_succeeds(data_dir: Path) -> None:
    corpus = make_corpus(seed=40, n_docs=80)
    shard = open_shard(data_dir, config=CONFIG.model_copy(update={"max_shard_bytes": 200 * 4096}))
    shard.apply(ShardWrite(upserts=corpus[:10]))
    shard.set_max_bytes(1)  # below the file: no new page
    big = ShardWrite(upserts=corpus[10:], offsets={"docs": {0: 99}})
    with pytest.raises(StorageFullError, match=r"shard .*shard-001: disk full"):
        shard.apply(big)
    health = shard.health()
    assert health["status"] == "degraded" and "disk full" in health["problem"]
    assert (health["chunks"], health["vectors"]) == (10, 10)
    assert shard.search(corpus[3].vector[None], 1)[0][0].chunk_id == corpus[3].chunk_id  # still serves
    shard.set_max_bytes(None)
    assert shard.health()["status"] == "degraded"  # until a write succeeds
    shard.apply(big)
    assert shard.health() == {
        "shard": 1, "status": "ok", "problem": None, "chunks": len(corpus), "vectors": len(corpus),
    }  # fmt: skip
    with pytest.raises(ValueError, match="max_bytes"):
        shard.set_max_bytes(0)
    shard.close()


def test_the_configured_quota_applies_from_the_start(data_dir: Path) -> None:
    shard = open_shard(data_dir, config=CONFIG.model_copy(update={"max_shard_bytes": 1}))
    with pytest.raises(StorageFullError):
        shard.apply(ShardWrite(upserts=make_corpus(seed=41)))
    shard.close()


def test_stats_and_health_read_counters_not_rows(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = make_corpus(seed=42, n_docs=10)
    shard = open_shard(data_dir)
    rows = {d: DocumentRow("h", 1) for d in ("doc-0", "doc-1", "doc-2")}
    shard.apply(ShardWrite(upserts=corpus, documents=rows, offsets={"docs": {0: 12}}))

    def scan(*args: object) -> object:
        raise AssertionError("stats and health must not scan the store")

    monkeypatch.setattr(ShardStore, "document_ids", scan)
    monkeypatch.setattr(ShardStore, "document_chunk_counts", scan)
    assert shard.stats() == {
        "shard": 1,
        "chunks": len(corpus),
        "vectors": len(corpus),
        "documents": 3,
        "offsets": {"docs": {0: 12}},
        "path": str(shard_directory(data_dir, 1)),
    }
    assert shard.health()["status"] == "ok"
    shard.close()
    assert shard.health()["status"] == "unavailable" and "not open" in shard.health()["problem"]


def test_a_store_that_cannot_be_read_is_unavailable(data_dir: Path) -> None:
    path = shard_directory(data_dir, 1)
    path.mkdir()
    (path / DB_NAME).write_bytes(b"not a database" * 100)
    shard = open_shard(data_dir, committed={"docs": {0: 1}})
    assert shard.health()["status"] == "unavailable"
    assert "cannot read the store's offsets" in shard.health()["problem"]


def test_a_store_from_before_schema_2_behind_the_committed_offsets_still_opens(data_dir: Path) -> None:
    # An older riverbed committed batches of only dead letters or unchanged documents without
    # recording their offsets on the shards: such a store may lag the group with nothing lost.
    from tests.unit.test_shard_store import write_v1_store

    write_v1_store(shard_directory(data_dir, 1), make_corpus(seed=5, n_docs=4))
    shard = open_shard(data_dir, committed={"docs": {0: 100}})
    assert shard.health()["status"] == "ok" and shard.count() > 0
    shard.close()
    again = open_shard(data_dir, committed={"docs": {0: 100}})  # upgraded: it took the offsets
    assert again.health()["status"] == "ok" and again.stats()["offsets"] == {"docs": {0: 100}}
    again.close()
