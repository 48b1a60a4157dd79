"""The graph shard actor's check of its store against the committed offsets (the actor's class,
called in process): a store behind the group neither serves nor writes; with the broker silent an
existing store serves reads while writes wait, and a missing store is not created until the check."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.graph_store import DB_NAME
from cluster.pipeline import GraphShardActor
from schemas.errors import IndexUnavailableError, RetryableError
from schemas.topology import Offsets, shard_directory
from tests.unit.test_graph_store import MODEL, TOPIC, chunk, upsert


class Broker:
    """The group's committed offsets as the actor reads them: None while the broker is silent."""

    def __init__(self, committed: Offsets | None) -> None:
        self.committed = committed
        self.asked: list[float] = []

    def __call__(self, timeout_s: float) -> Offsets | None:
        self.asked.append(timeout_s)
        return self.committed


def actor(data_dir: Path, broker: Broker) -> GraphShardActor:
    return GraphShardActor(data_dir, 0, MODEL, "wiki-graph", "unused:9092", "group", read_committed=broker)


def written(data_dir: Path) -> None:
    """A store that applied offset 0 of ``TOPIC``'s partition 0 (next offset 1)."""
    shard = actor(data_dir, Broker({}))
    shard.apply(upsert("d", 0, [chunk("d", 0, ["ada lovelace", "london"])]))


def test_a_store_behind_the_group_neither_serves_nor_writes(tmp_path: Path) -> None:
    written(tmp_path)
    shard = actor(tmp_path, Broker({TOPIC: {0: 5}}))
    for call in (lambda: shard.search("ada", 5), lambda: shard.apply(upsert("e", 5, []))):
        with pytest.raises(IndexUnavailableError, match=r"ahead on"):
            call()
    in_step = actor(tmp_path, Broker({TOPIC: {0: 1}}))
    assert [e["key"] for e in in_step.search("ada", 5)] == ["ada lovelace"]


def test_with_the_broker_silent_a_missing_store_is_not_created_until_the_check(tmp_path: Path) -> None:
    broker = Broker(None)
    shard = actor(tmp_path, broker)
    with pytest.raises(IndexUnavailableError, match="no store yet"):
        shard.search("ada", 5)
    with pytest.raises(RetryableError, match="not checked"):
        shard.apply(upsert("d", 0, [chunk("d", 0, ["ada lovelace"])]))
    assert not (shard_directory(tmp_path, 0) / DB_NAME).exists()
    # The broker answers: the group committed offset 3 (this shard's store was lost), so the
    # shard refuses rather than start an empty graph in its place.
    broker.committed = {TOPIC: {0: 3}}
    with pytest.raises(IndexUnavailableError, match="holds no store"):
        shard.apply(upsert("d", 3, [chunk("d", 0, ["ada lovelace"])]))
    assert not (shard_directory(tmp_path, 0) / DB_NAME).exists()
    assert broker.asked == [30.0, 5.0, 5.0]


def test_with_the_broker_silent_an_existing_store_serves_and_writes_after_the_check(tmp_path: Path) -> None:
    written(tmp_path)
    broker = Broker(None)
    shard = actor(tmp_path, broker)
    assert [e["key"] for e in shard.search("lon", 5)] == ["london"]
    with pytest.raises(RetryableError, match="not checked"):
        shard.apply(upsert("e", 1, [chunk("e", 0, ["charles babbage"])]))
    broker.committed = {TOPIC: {0: 1}}
    shard.apply(upsert("e", 1, [chunk("e", 0, ["charles babbage"])]))
    assert [e["key"] for e in shard.search("charles", 5)] == ["charles babbage"]
    shard.apply(upsert("f", 2, [chunk("f", 0, ["london"])]))
    assert broker.asked == [30.0, 5.0, 5.0], "checked once: later writes do not ask again"
