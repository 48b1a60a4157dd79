"""Serving through shard failures. Four clients search over HTTP while a shard actor's process is
SIGKILLed: every answer must be a 200 or a 503 naming the shard (a shard in trouble is never a
500), and once the shard is back the same queries must give the same results as before the kill.
A shard killed for good answers 503 naming it on every route until it is created again. With the
broker down, posting documents answers 503 within seconds, and works again once it is back. A
running ingest re-creates a shard killed for good on its next write. RAG past the generator's
queue is shed at once (503 ``overloaded``).

The index is small (its own, filled by the real pipeline, served by the real app) so the test
stays within a couple of minutes on two cores."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from cluster.local_kafka import LocalKafka
from deployments.ingress import BROKER_WAIT_S
from schemas.ids import shard_of
from schemas.settings import EmbeddedKafkaConfig
from schemas.topology import actor_name
from tests.integration.conftest import ServedIndex, served_index

N_DOCS = 120
CLIENTS = 4
RUN_S = 15.0  # the clients' whole run; the kill comes KILL_AFTER_S into it
KILL_AFTER_S = 3.0
MAX_REQUESTS = 4000  # all clients together: a bound whatever the machine's speed
QUERIES = [
    ("Which NFL team won Super Bowl 50?", "hybrid"),
    ("capital and largest city of Poland", "vector"),
    ("Normans Normandy France", "keyword"),
    ("Tesla alternating current motor", "hybrid"),
    ("photosynthesis in plant cells", "vector"),
    ("Broncos Panthers", "keyword"),
]


@pytest.fixture(scope="module")
def kafka(cache_dir, tmp_path_factory) -> Iterator[LocalKafka]:
    """The module's own broker, which a test may stop and start again (on the same port)."""
    own = LocalKafka(EmbeddedKafkaConfig(), cache_dir, tmp_path_factory.mktemp("faults-kafka"))
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def app(kafka, ray_session, tmp_path_factory) -> Iterator[ServedIndex]:
    # One answer at a time and one waiting: the shedding test overloads the generator on purpose.
    generator = {"max_ongoing_requests": 1, "max_queued_requests": 1}
    with served_index(kafka.start(), tmp_path_factory, N_DOCS, "faults", {"generator": generator}) as served:
        yield served


def results(http: httpx.Client) -> dict[tuple[str, str], list[str]]:
    """Each query's chunk ids, best first (every answer must be a 200)."""
    out = {}
    for query, mode in QUERIES:
        r = http.post("/v1/search", json={"query": query, "mode": mode, "k": 10})
        assert r.status_code == 200, r.text
        out[(query, mode)] = [h["chunk_id"] for h in r.json()["hits"]]
    return out


def assert_still_found(
    before: dict[tuple[str, str], list[str]], after: dict[tuple[str, str], list[str]]
) -> None:
    """Nothing indexed before a write is lost by it. A vector score does not depend on the rest of
    the index: those answers stay exactly the same (the new document is about something else). A
    keyword score does (BM25's document count, lengths and frequencies change with every document),
    so two near-tied chunks may swap: there every chunk of the old top 5 must still be in the top 10."""
    for (query, mode), ids in before.items():
        if mode == "vector":
            assert after[(query, mode)] == ids, (query, mode)
        else:
            assert set(ids[:5]) <= set(after[(query, mode)]), (query, mode, ids, after[(query, mode)])


class Clients:
    """``CLIENTS`` threads posting the queries in turn until stopped or ``MAX_REQUESTS`` are sent;
    they record every status, the first bodies of unexpected ones, and when each request began."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.unexpected: list[str] = []
        self.unavailable: list[dict] = []
        self.started: list[float] = []
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(CLIENTS)]

    def run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            i = n
            while not self.stop.is_set():
                with self.lock:
                    if len(self.started) >= MAX_REQUESTS:
                        return
                    self.started.append(time.monotonic())
                query, mode = QUERIES[i % len(QUERIES)]
                i += 1
                try:
                    r = http.post("/v1/search", json={"query": query, "mode": mode, "k": 10})
                except httpx.HTTPError as exc:  # the app dropped the connection: as bad as a 500
                    with self.lock:
                        self.statuses[-1] += 1
                        self.unexpected.append(repr(exc))
                    continue
                with self.lock:
                    self.statuses[r.status_code] += 1
                    if r.status_code == 503:
                        self.unavailable.append(r.json())
                    elif r.status_code != 200 and len(self.unexpected) < 5:
                        self.unexpected.append(f"{r.status_code}: {r.text[:500]}")

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def wait_healthy(http: httpx.Client, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        r = http.get("/healthz")
        body = r.json()
        if r.status_code == 200:
            return body
        time.sleep(0.5)
    raise AssertionError(f"/healthz not 200 within {timeout_s} s: {body}")


def test_posting_documents_with_the_broker_down_is_a_503_within_seconds_then_works_again(app, kafka):
    """Both ways a producer meets a dead broker: building one (the first post of this app), and
    sending on one already connected. Each answers 503 ``broker_unavailable`` well within the
    client's timeout (a few times :data:`BROKER_WAIT_S`, where the producer's own defaults block for
    60 s); the producer that failed is rebuilt, and the last post becomes searchable."""

    def doc(n: int) -> dict:
        return {"kind": "document", "id": f"broker-down-{n}", "text": f"Wombat number {n} digs a burrow."}

    with httpx.Client(base_url=app.url, timeout=4 * BROKER_WAIT_S) as http:
        kafka.stop()
        try:
            r = http.post("/v1/documents", json=doc(1))  # no producer yet: building one fails
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "broker_unavailable" and "retry shortly" in error["message"], error
        finally:
            kafka.start()
        post_until_accepted(http, doc(2))
        kafka.stop()
        try:
            for r in (http.post("/v1/documents", json=doc(3)), http.delete("/v1/documents/broker-down-2")):
                assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable", r.text
        finally:
            kafka.start()
        [record] = post_until_accepted(http, doc(4)).json()["records"]
        deadline = time.monotonic() + 120
        while not http.get("/v1/documents/broker-down-4").json()["indexed"]:
            assert time.monotonic() < deadline, "the document posted after the restart was never indexed"
            time.sleep(0.5)
    assert record["id"] == "broker-down-4" and record["offset"] >= 0


def test_killing_a_shard_while_4_clients_search_gives_only_200_and_503_then_full_results(app, capsys):
    s = app.settings
    with httpx.Client(base_url=app.url, timeout=120) as http:
        wait_healthy(http)
        before = results(http)
        assert all(before.values()), before
        shard = ray.get_actor(actor_name(s.index.name, "shard", 1), namespace=s.ray.namespace)
        pid = ray.get(shard.ping.remote(), timeout=30)

        t0 = time.monotonic()
        with Clients(app.url) as clients:
            time.sleep(KILL_AFTER_S)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            time.sleep(max(0.0, RUN_S - (time.monotonic() - t0)))
        new_pid = ray.get(shard.ping.remote(), timeout=120)  # restarted by Ray, same name and handle
        health = wait_healthy(http)
        after = results(http)

    statuses = dict(clients.statuses)
    after_kill = sum(1 for t in clients.started if t >= killed_at)
    with capsys.disabled():
        print(f"\n  shard 1 killed at {killed_at - t0:.1f} s: statuses {statuses}, "
              f"{len(clients.started)} requests ({after_kill} after the kill)")  # fmt: skip
    assert new_pid != pid, "the shard actor was restarted in a new process"
    assert set(statuses) <= {200, 503}, f"only 200 and 503 may answer: {statuses}; {clients.unexpected}"
    assert statuses.get(200, 0) > 0 and after_kill > 0
    for body in clients.unavailable:
        error = body["error"]
        assert error["code"] in ("index_unavailable", "unavailable"), body
        assert "shard" in error["message"], body
    assert health["status"] == "ok" and health["shards"] == 2
    assert after == before, "after the restart every query finds exactly what it found before"


def test_a_shard_killed_for_good_is_a_503_naming_it_until_it_is_created_again(app):
    """No restart this time: the old handle is dead. Every route that needs the shard answers 503
    naming it (search, document status, /healthz), and once the shard actor is created again (a new
    handle, found by name on the next request) every query finds what it found before."""
    from cluster.pipeline import shard_handles
    from cluster.serving import recorded_model

    s = app.settings
    with httpx.Client(base_url=app.url, timeout=120) as http:
        before = results(http)
        shard = ray.get_actor(actor_name(s.index.name, "shard", 1), namespace=s.ray.namespace)
        ray.kill(shard, no_restart=True)
        statuses = Counter()
        deadline = time.monotonic() + 60
        r = http.post("/v1/search", json={"query": QUERIES[0][0], "k": 3})
        while r.status_code != 503 and time.monotonic() < deadline:
            statuses[r.status_code] += 1
            time.sleep(0.2)
            r = http.post("/v1/search", json={"query": QUERIES[0][0], "k": 3})
        assert set(statuses) <= {200}, statuses
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "index_unavailable" and "shard 1" in error["message"], error
        for mode in ("vector", "keyword", "hybrid"):
            r = http.post("/v1/search", json={"query": "Warsaw", "mode": mode, "k": 3})
            assert r.status_code == 503 and "shard 1" in r.json()["error"]["message"], r.text
        r = http.get(f"/v1/documents/{next(iter(app.docs))}")
        assert r.status_code == 503 and "shard 1" in r.json()["error"]["message"], r.text
        health = http.get("/healthz")
        body = health.json()
        assert health.status_code == 503 and body["status"] == "unavailable", body
        assert any(p.startswith("shard 1: unavailable") for p in body["problems"]), body
        assert "riverbed_shard_status" in http.get("/metrics").text

        shard_handles(s, *recorded_model(s))  # what `riverbed serve` does for an index on disk
        wait_healthy(http)
        assert results(http) == before


def test_a_shard_killed_for_good_during_ingest_is_created_again_by_the_next_write(app):
    """The running ingest held the dead shard's handle and retried with it forever (every write of
    the index stopped). Now a write that finds a shard dead takes fresh handles, creating the shard
    again from its data on disk: the document is indexed and nothing already there is lost."""
    s = app.settings
    with httpx.Client(base_url=app.url, timeout=120) as http:
        before = results(http)
        chunks_before = wait_healthy(http)["chunks"]
        doc_id = "faults/after-a-kill"
        name = actor_name(s.index.name, "shard", shard_of(doc_id, s.index.n_shards))
        shard = ray.get_actor(name, namespace=s.ray.namespace)
        ray.kill(shard, no_restart=True)
        text = "The quokka of Rottnest Island wombat hopped past the numbat lighthouse."
        r = http.post("/v1/documents", json={"kind": "document", "id": doc_id, "text": text})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 180
        r = http.get(f"/v1/documents/{doc_id}")
        while not (r.status_code == 200 and r.json()["indexed"]) and time.monotonic() < deadline:
            assert r.status_code in (200, 503), r.text  # 503 while the shard is down
            time.sleep(1.0)
            r = http.get(f"/v1/documents/{doc_id}")
        assert r.status_code == 200 and r.json()["indexed"], r.text
        health = wait_healthy(http)
        assert health["chunks"] == chunks_before + r.json()["chunks"], health
        assert_still_found(before, results(http))
        hits = http.post("/v1/search", json={"query": "quokka numbat lighthouse", "mode": "keyword", "k": 1})
        assert hits.json()["hits"][0]["document_id"] == doc_id, hits.text


def post_until_accepted(http: httpx.Client, body: dict, timeout_s: float = 120) -> httpx.Response:
    """Posts ``body`` until it is accepted; every answer before that must be a 503
    ``broker_unavailable`` (the broker just came back: its partitions may have no leader yet)."""
    deadline = time.monotonic() + timeout_s
    r = http.post("/v1/documents", json=body)
    while r.status_code != 202 and time.monotonic() < deadline:
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable", r.text
        time.sleep(0.5)
        r = http.post("/v1/documents", json=body)
    assert r.status_code == 202, r.text
    return r


def test_rag_past_the_generators_queue_is_shed_at_once_with_503_overloaded(app):
    """Eight questions at once to a generator that takes one and queues one: the rest are refused
    at once with 503 ``overloaded`` and Retry-After, instead of waiting minutes; the others are
    answered."""
    question = {"question": "Which NFL team won Super Bowl 50?", "k": 3}

    def ask(_: int) -> tuple[httpx.Response, float]:
        start = time.monotonic()
        with httpx.Client(base_url=app.url, timeout=300) as http:
            r = http.post("/v1/rag", json=question)
        return r, time.monotonic() - start

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    shed = [(r, s) for r, s in answers if r.status_code == 503]
    answered = [r for r, _ in answers if r.status_code == 200]
    assert len(shed) + len(answered) == 8, [r.text for r, _ in answers]
    assert 1 <= len(answered) <= 7 and len(shed) >= 1, [r.status_code for r, _ in answers]
    for r, _ in shed:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1, r.text
    slowest_answer = max(s for r, s in answers if r.status_code == 200)
    assert max(s for _, s in shed) < slowest_answer, "a shed request is refused before answers come"
