"""Faults of the stream core, in this process against the real broker, with the real MiniLM
embedder and real FAISS + SQLite shards (no Ray): a crash between the two write phases, a stalled
member whose partitions another member took over, an embedding slower than its timeout.

Each test checks the end state by reading the shard stores, and compares it with what the chunker
makes of the versions that must win.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future

import numpy as np
import pytest

from actors.embedder import Embedder
from actors.faiss_index import FaissIndex
from actors.source import document_consumer
from actors.testing import LocalDownstream
from cluster.kafka_admin import committed_offsets, ensure_topics
from schemas.envelope import DocumentEnvelope
from tests.integration.ingest_helpers import expected_chunks, produce


@pytest.fixture(scope="module")
def embedder(cache_dir):
    from schemas.settings import EmbedConfig

    e = Embedder(EmbedConfig(device="cpu", num_cpus=1))
    e.warm_up()
    return e


def shards(settings, embedder, n=2):
    return [FaissIndex(settings.data_dir / f"shard-{i}", embedder.model_name, embedder.dim) for i in range(n)]


def consumer(settings, downstream, group, name, embed_timeout_s=300.0, **ingest):
    return document_consumer(
        settings.kafka,
        settings.ingest.model_copy(update=ingest),
        settings.chunk,
        settings.embed.model,
        settings.kafka.bootstrap_servers,
        group,
        downstream,
        name=name,
        embed_timeout_s=embed_timeout_s,
        retry_initial_s=0.1,
    )


def run_in_thread(source) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target():
        try:
            source.run()
        except BaseException as exc:  # a simulated crash, or a real failure the test reports
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def wait_for(condition, timeout_s=120, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stored_texts(indexes, doc_id):
    """The chunk texts of ``doc_id`` over all shards, by chunk number."""
    found = {}
    for index in indexes:
        for record in index.get([f"{doc_id}#{n}" for n in range(50)]):
            if record is not None:
                found[record.number] = record.text
    return [found[n] for n in sorted(found)]


def committed_total(settings, group):
    return sum(sum(p.values()) for p in committed_offsets(settings.kafka.bootstrap_servers, group).values())


LONG = " ".join(f"Sentence {i} of the second version, which is longer than the first one." for i in range(60))


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs, nothing is committed."""


class CrashBeforeRows(LocalDownstream):
    """Dies at the first phase-2 write (document rows), after phase 1 is durable."""

    def __init__(self, *args):
        super().__init__(*args)
        self.crashed = False

    def write(self, writes):
        if not self.crashed and any(w.documents for w in writes.values()):
            self.crashed = True
            raise _Crash
        return super().write(writes)


def test_a_crash_between_chunks_and_rows_then_edit_and_undo_leaves_the_undo(settings, embedder):
    v1 = DocumentEnvelope(id="doc", title="T", text="The first version, short.")
    v2 = DocumentEnvelope(id="doc", title="T", text=LONG)
    group = f"g-{uuid.uuid4().hex[:8]}"
    indexes = shards(settings, embedder)
    produce(settings, [v1])
    first = consumer(settings, LocalDownstream(embedder, indexes), group, "first")
    thread, errors = run_in_thread(first)
    wait_for(lambda: committed_total(settings, group) == 1, what="v1 committed")
    first.stop()
    thread.join(60)
    assert not errors

    # v2 is written to the shards, then the process dies before its registry row.
    produce(settings, [v2])
    crashing = CrashBeforeRows(embedder, indexes)
    second = consumer(settings, crashing, group, "second")
    thread, errors = run_in_thread(second)
    thread.join(120)
    assert crashing.crashed and isinstance(errors[0], _Crash)
    assert len(stored_texts(indexes, "doc")) > 1  # v2's chunks are on the shards

    # The edit is undone; the redelivery reads v2 and v1 again in one poll: v1 must win.
    produce(settings, [v1])
    third = consumer(settings, LocalDownstream(embedder, indexes), group, "third")
    thread, errors = run_in_thread(third)
    wait_for(lambda: committed_total(settings, group) == 3, what="all committed")
    third.stop()
    thread.join(60)
    assert not errors
    assert stored_texts(indexes, "doc") == ["The first version, short."]
    assert expected_chunks(settings, [v1]) == {"doc": 1}
    row = indexes[0].get_document_rows(["doc"]) or indexes[1].get_document_rows(["doc"])
    assert row["doc"].source[2] == 2  # the row reflects the last record


class BlockingWrites(LocalDownstream):
    """Holds the first write until ``release`` is set: a member frozen in the middle of a batch."""

    def __init__(self, *args):
        super().__init__(*args)
        self.release = threading.Event()
        self.blocked = threading.Event()

    def write(self, writes):
        if not self.release.is_set():
            self.blocked.set()
            self.release.wait(120)
        return super().write(writes)


def test_a_stalled_member_never_overwrites_what_its_successor_wrote(settings, embedder):
    topic = f"{settings.kafka.topics.documents}.one"
    ensure_topics(settings.kafka.bootstrap_servers, {topic: 1})
    s = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"topics": settings.kafka.topics.model_copy(update={"documents": topic})}
            )
        }
    )
    group = f"g-{uuid.uuid4().hex[:8]}"
    indexes = shards(s, embedder)
    old = DocumentEnvelope(id="doc", text="The old version, polled by the member that stalls.")
    new = DocumentEnvelope(id="doc", text="The new version, written by its successor.")
    produce(s, [old])
    stalled_down = BlockingWrites(embedder, indexes)
    stalled = consumer(s, stalled_down, group, "stalled", max_poll_interval_ms=4000, rejoin_after_s=600)
    thread_a, errors_a = run_in_thread(stalled)
    assert stalled_down.blocked.wait(180), "the first member never reached its write"  # slow when loaded

    produce(s, [new])
    successor = consumer(s, LocalDownstream(embedder, indexes), group, "successor", max_poll_interval_ms=4000)
    thread_b, errors_b = run_in_thread(successor)
    wait_for(lambda: committed_total(s, group) == 2, what="the successor's commit")
    assert stored_texts(indexes, "doc") == [new.text]

    stalled_down.release.set()  # the stalled member wakes up and writes its old version
    wait_for(lambda: stalled.counters["stale"] >= 1, what="the stale write to be refused")
    stalled.stop()
    successor.stop()
    thread_a.join(60)
    thread_b.join(60)
    assert not errors_a and not errors_b
    assert stored_texts(indexes, "doc") == [new.text]
    assert committed_total(s, group) == 2


class SlowEmbedder:
    """The real embedder, answering its first call only after ``delay_s`` (longer than the
    consumer's embed timeout); counts the texts it is asked for."""

    def __init__(self, embedder, delay_s):
        self.embedder, self.delay_s = embedder, delay_s
        self.asked: list[str] = []

    def submit(self, texts) -> Future:
        self.asked += texts
        future: Future = Future()
        delay = self.delay_s if len(self.asked) == len(texts) else 0.0
        threading.Timer(delay, lambda: future.set_result(self.embedder.embed(texts))).start()
        return future


class SlowDownstream(LocalDownstream):
    def __init__(self, slow, shards):
        super().__init__(slow.embedder, shards)
        self.slow = slow

    def embed(self, texts):
        return self.slow.submit(list(texts))


def test_an_embedding_slower_than_its_timeout_completes_once(settings, embedder):
    docs = [DocumentEnvelope(id=f"d{i}", text=f"Document number {i} about rivers.") for i in range(20)]
    produce(settings, docs)
    slow = SlowEmbedder(embedder, delay_s=4.0)
    indexes = shards(settings, embedder)
    group = f"g-{uuid.uuid4().hex[:8]}"
    source = consumer(settings, SlowDownstream(slow, indexes), group, "slow", embed_timeout_s=1.0)
    thread, errors = run_in_thread(source)
    wait_for(lambda: committed_total(settings, group) == 20, what="all committed")
    source.stop()
    thread.join(60)
    assert not errors
    assert sorted(slow.asked) == sorted(d.text for d in docs)  # each text embedded exactly once
    assert source.counters["embed_slow"] >= 1 and source.counters["documents"] == 20
    assert sum(index.count() for index in indexes) == 20
    assert all(np.isfinite(r.vector).all() for r in indexes[0].get([f"d{i}#0" for i in range(20)]) if r)


class NaNForMarked:
    """The real embedder, except that a text holding ``MARK`` comes back as NaN (a model that
    breaks on some input)."""

    MARK = "overflowing"

    def __init__(self, embedder):
        self.embedder = embedder

    def embed(self, texts):
        vectors = self.embedder.embed(texts)
        for i, text in enumerate(texts):
            if self.MARK in text:
                vectors[i] = np.nan
        return vectors


def test_a_document_embedded_to_nan_is_dead_lettered_and_the_rest_ingested(settings, embedder):
    from kafka import KafkaConsumer

    docs = [
        DocumentEnvelope(id=f"d{i}", text=f"Document {i} about rivers and their beds.") for i in range(10)
    ]
    bad = DocumentEnvelope(id="bad", text=f"A text the model finds {NaNForMarked.MARK}.")
    produce(settings, [*docs[:5], bad, *docs[5:]])
    indexes = shards(settings, embedder)
    group = f"g-{uuid.uuid4().hex[:8]}"
    source = consumer(settings, LocalDownstream(NaNForMarked(embedder), indexes), group, "nan")
    thread, errors = run_in_thread(source)
    wait_for(lambda: committed_total(settings, group) == 11, what="all committed")
    source.stop()
    thread.join(60)
    assert not errors
    assert sum(index.count() for index in indexes) == 10
    assert {r.document_id for i in indexes for r in i.get([f"d{n}#0" for n in range(10)]) if r} == {
        d.id for d in docs
    }
    letters = KafkaConsumer(
        settings.kafka.topics.dead_letter,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    got = [(r.key, dict(r.headers)) for r in letters]
    letters.close()
    assert [(key, h["reason"], h["error"]) for key, h in got] == [
        (b"bad", b"processing_error", b"the embedding holds NaN or infinity")
    ]
