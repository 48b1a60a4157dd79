"""StreamConsumer with a stub Kafka consumer (no broker): batching, dead letters, the retry
classification, isolating a record that cannot be processed, rebalance drop and rewind, commit
failure and redelivery, a slow embedding that is never sent twice; and the ImageProcessor driven
through it onto in-memory shards.

The stub keeps kafka-python's consumer semantics that the consumer relies on: positions per
partition, pause/resume, seek, commit, and rebalance callbacks run inside ``poll``.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time
from collections import Counter, namedtuple
from concurrent.futures import Future

import numpy as np
import pytest
from kafka.errors import CommitFailedError
from kafka.structs import TopicPartition
from PIL import Image

from actors.failures import classify
from actors.image_processor import ImageProcessor
from actors.processor import Unit, Writes
from actors.stream_consumer import StreamConsumer
from actors.testing.downstream import LocalDownstream
from actors.testing.memory_index import InMemoryIndex
from actors.vector_index import ShardWrite, WriteResult
from schemas.envelope import IMAGE_THUMBNAIL_KEY
from schemas.errors import (
    IndexUnavailableError,
    PoisonMessageError,
    ProcessingError,
    RetryableError,
    StorageFullError,
)
from schemas.settings import ImagesConfig, IngestConfig, KafkaConfig

TOPIC = "docs"
Rec = namedtuple("Rec", "topic partition offset key value")


class StubConsumer:
    def __init__(self, log: dict[int, list[tuple[bytes | None, bytes | None]]], listener) -> None:
        self.log = log
        self.listener = listener
        self.position = dict.fromkeys(log, 0)
        self.committed: dict[int, int] = {}
        self.paused: set[int] = set()
        self.assigned = set(log)
        self.fail_commits = 0
        self.rebalance_on_poll: int | None = None  # revoke and re-assign inside the n-th poll
        self.polls = 0

    def assignment(self):
        return {TopicPartition(TOPIC, p) for p in self.assigned}

    def partitions_for_topic(self, topic):
        return set(self.log)

    def poll(self, timeout_ms=0, max_records=None):
        self.polls += 1
        if self.rebalance_on_poll == self.polls:
            self.listener.on_partitions_revoked(self.assignment())
            for p in self.assigned:  # a new generation starts from the committed offsets
                self.position[p] = self.committed.get(p, 0)
            self.paused.clear()
            self.listener.on_partitions_assigned(self.assignment())
        out, budget = {}, max_records or 10**9
        for p in sorted(self.assigned - self.paused):
            while budget and self.position[p] < len(self.log[p]):
                key, value = self.log[p][self.position[p]]
                out.setdefault(TopicPartition(TOPIC, p), []).append(
                    Rec(TOPIC, p, self.position[p], key, value)
                )
                self.position[p] += 1
                budget -= 1
        return out

    def pause(self, *tps):
        self.paused |= {tp.partition for tp in tps}

    def resume(self, *tps):
        self.paused -= {tp.partition for tp in tps}

    def seek(self, tp, offset):
        self.position[tp.partition] = offset

    def commit(self, offsets):
        if self.fail_commits:
            self.fail_commits -= 1
            raise CommitFailedError("the group rebalanced")
        for tp, meta in offsets.items():
            self.committed[tp.partition] = meta.offset

    def close(self, autocommit=False, timeout_ms=None):
        pass


class Letters:
    def __init__(self) -> None:
        self.sent: list = []
        self.counts: Counter[str] = Counter()

    def send(self, letter) -> None:
        self.sent.append(letter)
        self.counts[letter.reason] += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class EchoProcessor:
    """One text per document; its phase-1 write lists the document ids (the downstream reads them)."""

    kind = "document"

    def __init__(self) -> None:
        self.stored_seen: list[dict] = []

    def warm_up(self) -> None:
        pass

    def prepare(self, items, stored):
        self.stored_seen.append(dict(stored))
        units, failed = [], []
        for item in items:
            if item.envelope.text == "cannot chunk":
                failed.append((item, "chunking failed: no tokens"))
            elif item.envelope.text == "bad image":  # a failure with its own reason
                failed.append((item, PoisonMessageError("invalid_image", "not a PNG image")))
            else:
                units.append(Unit(item, [item.envelope.text or ""], item.id, counts={"documents": 1}))
        return units, failed

    def writes(self, units, n_shards):
        ids = [u.payload for u in units]
        return Writes({0: ShardWrite(delete_chunks=ids)}, {})


class Downstream:
    """Records written ids; raises what a test asks for."""

    n_shards = 2

    def __init__(self) -> None:
        self.written: list[str] = []
        self.erased: list[str] = []
        self.offsets: list[dict] = []
        self.fail_writes: list[BaseException] = []  # raised by the next write calls, in order
        self.poison: set[str] = set()  # ids whose write always fails
        self.poison_error: type[Exception] = ProcessingError
        self.nan: set[str] = set()  # texts embedded to NaN
        self.embed_calls: list[list[str]] = []
        self.embed_future: Future | None = None  # a test-controlled (slow) future
        self.embed_errors: list[BaseException] = []  # the next embed calls fail with these, in order

    def embed(self, texts):
        self.embed_calls.append(list(texts))
        if self.embed_future is not None:
            return self.embed_future
        future: Future = Future()
        if self.embed_errors:
            future.set_exception(self.embed_errors.pop(0))
            return future
        vectors = np.ones((len(texts), 4), np.float32)
        for i, t in enumerate(texts):
            if t in self.nan:
                vectors[i] = np.nan
        future.set_result(vectors)
        return future

    def stored(self, ids):
        from actors.processor import StoredDocument

        return {i: StoredDocument(None) for i in ids}

    def write(self, writes):
        if self.fail_writes:
            raise self.fail_writes.pop(0)
        for write in writes.values():
            if self.poison.intersection(write.delete_chunks):
                raise self.poison_error(f"cannot bind {sorted(self.poison & set(write.delete_chunks))}")
        for write in writes.values():
            self.written += list(write.delete_chunks)
            self.erased += list(write.delete_documents)
            if write.offsets:
                self.offsets.append({t: dict(p) for t, p in write.offsets.items()})
        return {i: WriteResult(0, 0, 0) for i in writes}


def envelope(doc_id: str, text: str = "some text") -> tuple[bytes, bytes]:
    return doc_id.encode(), json.dumps({"kind": "document", "id": doc_id, "text": text}).encode()


def make(log, downstream=None, **ingest):
    downstream = downstream or Downstream()
    letters = Letters()
    holder = {}

    def factory(listener):
        holder["consumer"] = StubConsumer(log, listener)
        return holder["consumer"]

    consumer = StreamConsumer(
        KafkaConfig(topics={"documents": TOPIC}),
        IngestConfig(**{"poll_max_records": 4, **ingest}),
        TOPIC,
        "stub:9092",
        "g",
        EchoProcessor(),
        downstream,
        max_wait_s=0.0,
        embed_timeout_s=0.2,
        consumer_factory=factory,
        dead_letters=letters,
        retry_initial_s=0.01,
    )
    consumer.warm_up()
    return consumer, holder["consumer"], downstream, letters


def run_until(consumer, stub, done, steps=200):
    for _ in range(steps):
        consumer.step()
        if done():
            return
    raise AssertionError(f"not done after {steps} steps: {consumer.stats()}")


def all_committed(stub):
    return lambda: all(stub.committed.get(p, 0) == len(recs) for p, recs in stub.log.items())


def test_every_record_is_written_once_and_committed():
    log = {0: [envelope(f"a{i}") for i in range(6)], 1: [envelope(f"b{i}") for i in range(5)]}
    consumer, stub, down, letters = make(log)
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)])
    assert consumer.counters["documents"] == 11 and not letters.sent
    # every batch's offsets reached every shard before its commit
    assert all(set(o[TOPIC]) <= {0, 1} for o in down.offsets) and len(down.offsets) % 2 == 0


def test_bad_records_are_dead_lettered_with_their_reason_and_the_rest_goes_on():
    log = {0: [envelope("a"), (b"x", b"{not json"), envelope("c", "cannot chunk"), (b"k", b'{"a": NaN}'),
               envelope("d"), envelope("e", "bad image")]}  # fmt: skip
    consumer, stub, down, letters = make(log)
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == ["a", "d"]
    assert sorted((x.offset, x.reason) for x in letters.sent) == [
        (1, "invalid_json"), (2, "processing_error"), (3, "invalid_json"), (5, "invalid_image")
    ]  # fmt: skip
    assert [x.error for x in letters.sent if x.offset == 2] == ["chunking failed: no tokens"]
    assert [x.error for x in letters.sent if x.offset == 5] == ["not a PNG image"]


def test_a_record_that_cannot_be_written_is_isolated_and_the_batch_commits():
    log = {0: [envelope(f"d{i}") for i in range(8)]}
    down = Downstream()
    down.poison = {"d5"}
    consumer, stub, down, letters = make(log, down, poll_max_records=8)
    run_until(consumer, stub, all_committed(stub))
    assert sorted(set(down.written)) == sorted(f"d{i}" for i in range(8) if i != 5)
    assert [(x.reason, x.key) for x in letters.sent] == [("processing_error", b"d5")]
    assert "cannot bind" in letters.sent[0].error
    assert consumer.counters["processing_errors"] == 1 and consumer.counters["documents"] == 7
    assert down.offsets[-1] == {TOPIC: {0: 8}}  # the offsets are still written after isolating
    assert down.erased == ["d5", "d5"]  # what a shard may have taken of it is erased on every shard


def test_transient_failures_are_retried_visibly_and_nothing_is_dead_lettered():
    log = {0: [envelope("a"), envelope("b")]}
    down = Downstream()
    down.fail_writes = [RetryableError("shard 1 died"), StorageFullError("shard 1: disk full")]
    consumer, stub, down, letters = make(log, down)
    seen = []
    original = consumer._wait

    def watch(delay, batch):
        seen.append(consumer.stats()["stalled"])
        original(delay, batch)

    consumer._wait = watch
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == ["a", "b"] and not letters.sent
    assert consumer.stats()["retries"] == {"writing chunks": 2}
    assert seen == ["writing chunks: shard 1 died", "writing chunks: shard 1: disk full"]
    assert consumer.stats()["stalled"] is None


def test_an_unknown_error_is_retried_three_times_then_isolated():
    log = {0: [envelope("a")]}
    down = Downstream()
    down.poison, down.poison_error = {"a"}, RuntimeError
    consumer, stub, down, letters = make(log, down)
    run_until(consumer, stub, all_committed(stub))
    # 3 tries for the batch, 3 for the record alone: 2 retries each
    assert consumer.stats()["retries"] == {"writing chunks": 4}
    assert [x.reason for x in letters.sent] == ["processing_error"]
    assert letters.sent[0].error == "RuntimeError: cannot bind ['a']"


def test_a_document_embedded_to_nan_is_dead_lettered_alone():
    log = {0: [envelope("a", "fine"), envelope("b", "makes nan"), envelope("c", "fine too")]}
    down = Downstream()
    down.nan = {"makes nan"}
    consumer, stub, down, letters = make(log, down)
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == ["a", "c"]
    assert [(x.key, x.error) for x in letters.sent] == [(b"b", "the embedding holds NaN or infinity")]


def test_a_rebalance_drops_in_flight_batches_and_rewinds_to_them():
    log = {0: [envelope(f"d{i}") for i in range(8)]}
    down = Downstream()
    slow: Future = Future()
    down.embed_future = slow  # the first batch waits for its vectors
    consumer, stub, down, _ = make(log, down, max_in_flight_batches=2)
    consumer.step()  # batch 1 polled, embedding
    consumer.step()  # batch 2 polled
    assert consumer.stats()["in_flight_batches"] == 2 and not down.written
    stub.rebalance_on_poll = stub.polls + 1
    consumer.step()  # backpressure poll: the rebalance drops both batches
    assert consumer.stats()["in_flight_batches"] == 0
    assert consumer.counters["reread_after_rebalance"] == 8
    down.embed_future = None
    slow.set_result(np.ones((4, 4), np.float32))  # the dropped batch's late vectors change nothing
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == sorted(f"d{i}" for i in range(8))  # each once: read again from 0


def test_a_rebalance_while_isolating_an_embedding_failure_drops_the_batch_without_crashing():
    log = {0: [envelope(f"d{i}") for i in range(4)]}
    down = Downstream()
    # The batch's embedding fails for good, so its halves are embedded alone; the first half's
    # call fails transiently, and a rebalance arrives while the consumer waits to retry it.
    down.embed_errors = [ValueError("tokenizer broke"), RetryableError("embedder restarting")]
    consumer, stub, down, letters = make(log, down)
    stub.rebalance_on_poll = 2  # the first poll reads the batch; the next one is the wait's
    run_until(consumer, stub, all_committed(stub))
    assert sorted(down.written) == sorted(f"d{i}" for i in range(4)) and not letters.sent
    assert consumer.counters["reread_after_rebalance"] == 4


def test_a_failed_commit_drops_what_is_in_flight_and_the_records_are_read_again():
    log = {0: [envelope(f"d{i}") for i in range(4)]}
    consumer, stub, down, _ = make(log)
    stub.fail_commits = 1
    run_until(consumer, stub, all_committed(stub))
    assert consumer.stats()["commit_failures"] == 1
    assert sorted(down.written) == sorted(2 * [f"d{i}" for i in range(4)])  # written again, idempotently
    assert consumer.counters["documents"] == 4  # counted once: the first write was never committed


def test_a_slow_embedding_is_reported_and_never_sent_again():
    log = {0: [envelope("a"), envelope("b")]}
    down = Downstream()
    slow: Future = Future()
    down.embed_future = slow
    consumer, stub, down, _ = make(log, down)
    consumer.step()
    threading.Timer(0.6, lambda: slow.set_result(np.ones((2, 4), np.float32))).start()
    stalled = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all_committed(stub)():
        consumer.step()
        stalled.append(consumer.stats()["stalled"])
        time.sleep(0.01)
    assert all_committed(stub)()
    assert len(down.embed_calls) == 1  # the same texts were never queued behind themselves
    assert consumer.counters["embed_slow"] == 1
    assert any(s and s.startswith("embedding: batch 1 has waited") for s in stalled)
    assert sorted(down.written) == ["a", "b"]


def test_an_id_in_a_batch_still_in_flight_is_in_progress_for_the_next_batch():
    log = {0: [envelope("a"), envelope("b"), envelope("a", "v2")]}
    down = Downstream()
    slow: Future = Future()
    down.embed_future = slow
    consumer, _, down, _ = make(log, down, poll_max_records=2, max_in_flight_batches=2)
    consumer.step()
    down.embed_future = None
    consumer.step()
    assert consumer.processor.stored_seen[1]["a"].in_progress


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RetryableError("x"), "transient"),
        (StorageFullError("x"), "transient"),
        (IndexUnavailableError("shard 1 holds less than committed"), "transient"),
        (TimeoutError(), "transient"),
        (ValueError("x"), "permanent"),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "permanent"),
        (ProcessingError("x"), "permanent"),
        (sqlite3.OperationalError("database is locked"), "transient"),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), "permanent"),
        (RuntimeError("x"), "unknown"),
    ],
)
def test_failures_are_classified_by_what_retrying_would_do(exc, kind):
    assert classify(exc) == kind


class PixelEmbedder:
    """Embeds the ImageProcessor's pixel arrays: mean colour and a constant, 4 dimensions."""

    def embed(self, inputs):
        assert all(isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 for x in inputs)
        return np.array([[*(x.mean(axis=(0, 1)) / 255), 1.0] for x in inputs], np.float32).reshape(-1, 4)


def image_record(image_id: str, color: tuple[int, int, int] | None, caption: str = "") -> tuple[bytes, bytes]:
    if color is None:
        data = b"not an image"
    else:
        out = io.BytesIO()
        Image.new("RGB", (20, 10), color).save(out, format="PNG")
        data = out.getvalue()
    body = {"kind": "image", "id": image_id, "image_b64": base64.b64encode(data).decode(), "caption": caption}
    return image_id.encode(), json.dumps(body).encode()


def test_images_go_through_the_image_processor_to_the_shards():
    log = {
        0: [image_record("a", (255, 0, 0), "red"), image_record("bad", None),  # batch 1
            image_record("c", (0, 0, 255)), image_record("a", (255, 0, 0), "red"),  # batch 2: a again
            (b"c", None)],  # batch 3: a tombstone
    }  # fmt: skip
    shards = [InMemoryIndex("pixels", 4) for _ in range(2)]
    letters, holder = Letters(), {}

    def factory(listener):
        holder["stub"] = StubConsumer(log, listener)
        return holder["stub"]

    consumer = StreamConsumer(
        KafkaConfig(topics={"images": TOPIC}),
        IngestConfig(poll_max_records=2),
        TOPIC,
        "stub:9092",
        "g",
        ImageProcessor(ImagesConfig(thumbnail_size=16)),
        LocalDownstream(PixelEmbedder(), shards),
        max_wait_s=0.0,
        consumer_factory=factory,
        dead_letters=letters,
        retry_initial_s=0.01,
    )
    consumer.warm_up()
    run_until(consumer, holder["stub"], all_committed(holder["stub"]))
    assert [(x.offset, x.reason) for x in letters.sent] == [(1, "invalid_image")]
    assert {k: consumer.counters[k] for k in ("images", "unchanged", "deletes")} == {
        "images": 2, "unchanged": 1, "deletes": 1
    }  # fmt: skip
    assert set().union(*(s.document_ids() for s in shards)) == {"a"}
    (record,) = [r for s in shards for r in s.get(["a#0"]) if r is not None]
    assert record.text == "red" and IMAGE_THUMBNAIL_KEY in record.metadata
    assert record.vector[0] > 0.9 and record.vector[2] < 0.1  # the red image's pixels were embedded
