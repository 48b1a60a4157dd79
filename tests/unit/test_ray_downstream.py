"""How a source's downstream finds its shard actors without Ray: on the first call that needs
them (the source is built while the embedder still loads the model the shards are made for), once,
and again after one died for good; a failure to find them is never the records' fault."""

from __future__ import annotations

import pytest

from cluster.pipeline import RayDownstream
from schemas.errors import RetryableError


class Finder:
    """Stands for the lookup by name: hands out numbered handle lists, or fails while told to."""

    def __init__(self, n_shards: int) -> None:
        self.n_shards = n_shards
        self.calls = 0
        self.failure: Exception | None = None

    def __call__(self) -> list[str]:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return [f"handle-{self.calls}-{i}" for i in range(self.n_shards)]


def test_the_shards_are_found_on_first_use_and_kept():
    finder = Finder(3)
    downstream = RayDownstream(["embedder"], 3, finder)
    assert finder.calls == 0  # building the downstream (the source) asks nothing
    assert downstream.n_shards == 3
    assert downstream.shards == ["handle-1-0", "handle-1-1", "handle-1-2"]
    assert downstream.shards == ["handle-1-0", "handle-1-1", "handle-1-2"]
    assert finder.calls == 1


def test_a_failed_lookup_is_retryable_whatever_raised_it_and_is_tried_again():
    finder = Finder(2)
    finder.failure = ValueError("Failed to look up actor with name 't/shard/0'")
    downstream = RayDownstream(["embedder"], 2, finder)
    with pytest.raises(RetryableError, match=r"finding the shard actors failed.*t/shard/0"):
        _ = downstream.shards
    finder.failure = None
    assert downstream.shards == ["handle-2-0", "handle-2-1"]


def test_a_lookup_that_finds_too_few_shards_is_retryable():
    downstream = RayDownstream(["embedder"], 4, Finder(3))
    with pytest.raises(RetryableError, match="found 3 shard actors for 4 shards"):
        _ = downstream.shards


def test_a_shard_dead_for_good_makes_the_next_call_look_the_shards_up_again():
    finder = Finder(2)
    downstream = RayDownstream(["embedder"], 2, finder)
    first = downstream.shards
    downstream._revive(RuntimeError("the actor died"))
    assert downstream.shards != first and finder.calls == 2


class Handle:
    """Stands for a shard actor's handle: ``apply.remote`` gives a reference to ``ray.get``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.apply = self

    def remote(self, write: object) -> tuple[str, object]:
        return (self.name, write)


def test_a_write_to_a_shard_dead_for_good_is_retryable_and_the_retry_uses_fresh_handles(monkeypatch):
    """Through ``write``: Ray says the actor died (for good); the write fails retryably (the
    consumer retries it, never dead-letters its records) and the next one goes to the handles found
    again, not to the dead one."""
    from ray.exceptions import ActorDiedError

    import cluster.pipeline as pipeline
    from actors.failures import classify

    made: list[list[Handle]] = []

    def find() -> list[Handle]:
        made.append([Handle(f"shard-{i}@{len(made)}") for i in range(2)])
        return made[-1]

    downstream = RayDownstream(["embedder"], 2, find)
    sent: list[tuple[str, object]] = []

    def dead_then_alive(refs: list[tuple[str, object]], timeout: float) -> list[str]:
        if len(made) == 1:
            raise ActorDiedError()
        sent.extend(refs)
        return ["ok" for _ in refs]

    monkeypatch.setattr(pipeline.ray, "get", dead_then_alive)
    with pytest.raises(RetryableError, match="shard write failed") as failed:
        downstream.write({1: "w1"})  # type: ignore[dict-item]
    assert classify(failed.value) == "transient"
    assert downstream.write({1: "w1"}) == {1: "ok"}  # type: ignore[dict-item]
    assert sent == [("shard-1@1", "w1")] and len(made) == 2
