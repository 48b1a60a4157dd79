"""`riverbed bench load`: mixed traffic against the app with API keys on, at 1, 4, 16 and 64 clients.

# INDEX: SQuAD v1.1 passages in the bench's own index and topics (built on the first run, reused)
# APP: `riverbed serve` on loopback with ingest and one generated read+write API key, which every
#   request sends as `Authorization: Bearer`
# BULK (first, on an app nothing else loads): search alone at BULK_CLIENTS clients for
#   ``seconds``, then the same search while 2,048-input ``/v1/embeddings`` requests run one after
#   another (the last one starts before ``seconds`` have passed); the search p99 with them must
#   stay within twice the p99 alone
# MIX: every client takes its next turn from one shared cycle (:data:`MIX`: search, RAG,
#   embeddings of a few questions, and documents: post a small envelope, then delete it, so the
#   index ends as it began) and sends it as soon as its previous answer arrived (closed loop)
# LEVELS: at each client count, turns are handed out until ``seconds`` have passed or
#   ``requests`` requests were sent, whichever comes first; the requests then in flight finish
#   (or time out after REQUEST_TIMEOUT_S, which counts as an error)
# AFTER: ingest drains, and the index must hold as many chunks as before the load
# How requests are counted and reported: cluster/bench/load_report.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from cluster.bench.load_report import (
    Phase,
    Sample,
    findings,
    outcome,
    phase_report,
    summarize,
    write_load_report,
)
from cluster.bench.query import build_index, load_queries
from cluster.bench.report import machine
from cluster.serving import start_serving, wait_ready
from schemas.errors import ConfigError
from schemas.settings import ApiKey, AuthConfig, Settings

log = logging.getLogger(__name__)

Kind = Literal["search", "rag", "embeddings", "documents"]
LEVELS = (1, 4, 16, 64)
MIX: dict[Kind, int] = {"search": 12, "rag": 1, "embeddings": 3, "documents": 4}
"""Turns of each kind in one cycle of 20, spread evenly by :func:`mix_cycle`."""
TURN_REQUESTS: dict[Kind, int] = {"search": 1, "rag": 1, "embeddings": 1, "documents": 2}
"""Requests a turn sends: a documents turn posts an envelope, then deletes it."""
METHODS: dict[str, str] = {
    "search": "POST",
    "rag": "POST",
    "embeddings": "POST",
    "bulk embeddings": "POST",
    "documents post": "POST",
    "documents delete": "DELETE",
}
"""The routes the bench reports, by name, and their HTTP methods."""
QUERIES = 400
"""Questions that search, RAG, embeddings and documents turns take in turn."""
EMBED_INPUTS = 16
"""Questions per embeddings request of the mix."""
BULK_INPUTS = 2048
BULK_CLIENTS = 4
REQUEST_TIMEOUT_S = 120.0
BULK_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 300.0
INDEX = "bench-load"


# MIX
def mix_cycle(weights: Mapping[Kind, int]) -> list[Kind]:
    """One cycle holding each kind ``weights[kind]`` times, spread as evenly as they go (smooth
    weighted round robin; ties go to the kind named first). Raises ``ValueError`` for no kinds or
    a weight below 1."""
    if not weights or min(weights.values()) < 1:
        raise ValueError(f"every weight must be at least 1 (got {dict(weights)})")
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    cycle: list[Kind] = []
    for _ in range(total):
        for kind, weight in weights.items():
            current[kind] += weight
        chosen = max(current, key=lambda k: current[k])
        current[chosen] -= total
        cycle.append(chosen)
    return cycle


class Budget:
    """Hands out the turns of ``cycle``, in order and round again, until one of: the next turn's
    requests (:data:`TURN_REQUESTS`) would take the total past ``requests``, ``seconds`` have
    passed on ``clock`` since the budget was made, or :meth:`close` was called. Once it has said
    None it always does. One event loop's clients share it (not thread-safe)."""

    def __init__(
        self,
        cycle: Sequence[Kind],
        requests: int,
        seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not cycle or requests < 1 or not seconds > 0:
            raise ConfigError(
                f"a load level needs turns, requests >= 1 and seconds > 0 (got {requests}, {seconds})"
            )
        self.cycle, self.requests, self.clock = list(cycle), requests, clock
        self.deadline = clock() + seconds
        self.turns = self.sent = 0
        self.closed = False

    def next(self) -> Kind | None:
        if self.closed:
            return None
        kind = self.cycle[self.turns % len(self.cycle)]
        if self.sent + TURN_REQUESTS[kind] > self.requests or self.clock() >= self.deadline:
            self.closed = True
            return None
        self.turns += 1
        self.sent += TURN_REQUESTS[kind]
        return kind

    def close(self) -> None:
        self.closed = True


@dataclass
class Workload:
    """What the requests carry: search and RAG take ``queries`` in turn (embeddings requests the
    next EMBED_INPUTS of them), bulk requests all of ``bulk``; posted documents get fresh ids
    under ``bench-load/<run>/``."""

    queries: list[str]
    bulk: list[str]
    mode: str
    k: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    position: int = 0
    documents: int = 0

    def texts(self, n: int) -> list[str]:
        start, self.position = self.position, self.position + n
        return [self.queries[i % len(self.queries)] for i in range(start, start + n)]

    def document_id(self) -> str:
        self.documents += 1
        return f"{INDEX}/{self.run}/{self.documents}"


# REQUESTS
def http_client(url: str, key: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


async def send(
    client: httpx.AsyncClient, samples: list[Sample], route: str, path: str, body: Any = None
) -> int:
    """Sends one request of ``route`` to ``path``, appends its :class:`Sample`, returns its status."""
    method = METHODS[route]
    start = time.perf_counter()
    code = None
    try:
        response = await client.request(method, path, json=body)
        status = response.status_code
        if outcome(status) != "ok":
            code = _error_code(response)
    except httpx.HTTPError as exc:  # no answer: a timeout, a refused or dropped connection
        status, code = 0, type(exc).__name__
    samples.append(Sample(route, status, start, time.perf_counter() - start, code))
    return status


async def take_turn(kind: Kind, client: httpx.AsyncClient, work: Workload, samples: list[Sample]) -> None:
    """Sends a turn's requests (:data:`TURN_REQUESTS`) one after the other, each one's
    :class:`Sample` appended to ``samples``."""
    if kind == "search":
        body: dict[str, Any] = {"query": work.texts(1)[0], "k": work.k, "mode": work.mode}
        await send(client, samples, "search", "/v1/search", body)
    elif kind == "rag":
        await send(client, samples, "rag", "/v1/rag", {"question": work.texts(1)[0]})
    elif kind == "embeddings":
        body = {"input": work.texts(EMBED_INPUTS), "encoding_format": "base64"}
        await send(client, samples, "embeddings", "/v1/embeddings", body)
    else:  # the delete goes whatever the post answered: a delete of a gone id is none
        doc_id = work.document_id()
        text = work.texts(1)[0]
        body = {
            "kind": "document",
            "id": doc_id,
            "title": "bench load",
            "text": text,
            "metadata": {"bench": "load"},
        }
        await send(client, samples, "documents post", "/v1/documents", body)
        await send(client, samples, "documents delete", f"/v1/documents/{quote(doc_id, safe='')}")


async def drive(client: httpx.AsyncClient, budget: Budget, work: Workload, samples: list[Sample]) -> None:
    """One closed-loop client: takes turns from ``budget`` until it says None."""
    while (kind := budget.next()) is not None:
        await take_turn(kind, client, work, samples)


# LEVELS
async def run_level(url: str, key: str, work: Workload, clients: int, seconds: float, requests: int) -> Phase:
    """``clients`` closed-loop clients on the :data:`MIX` cycle until the budget closes."""
    samples: list[Sample] = []
    async with http_client(url, key, clients, REQUEST_TIMEOUT_S) as client:
        budget = Budget(mix_cycle(MIX), requests, seconds)
        start = time.perf_counter()
        await asyncio.gather(*(drive(client, budget, work, samples) for _ in range(clients)))
        return Phase(clients, samples, time.perf_counter() - start)


async def bulk_loop(
    url: str, key: str, work: Workload, budget: Budget, seconds: float, samples: list[Sample]
) -> None:
    """Sends ``work.bulk`` as one embeddings request after another until ``seconds`` have passed
    (the last one finishes), one fails to answer, or ``budget`` closes; then closes ``budget``."""
    body = {"input": work.bulk, "encoding_format": "base64"}
    start = time.monotonic()
    try:
        async with http_client(url, key, 1, BULK_TIMEOUT_S) as client:
            while not budget.closed:
                status = await send(client, samples, "bulk embeddings", "/v1/embeddings", body)
                if status == 0 or time.monotonic() - start >= seconds:
                    break
    finally:
        budget.close()


async def search_phase(
    url: str, key: str, work: Workload, clients: int, seconds: float, requests: int, bulk: bool
) -> Phase:
    """Search alone at ``clients`` clients for ``seconds``; with ``bulk``, for as long as
    :func:`bulk_loop` runs instead, so every search is sent while a bulk request is in flight."""
    samples: list[Sample] = []
    async with http_client(url, key, clients, REQUEST_TIMEOUT_S) as client:
        budget = Budget(["search"], requests, math.inf if bulk else seconds)
        start = time.perf_counter()
        loads = [drive(client, budget, work, samples) for _ in range(clients)]
        if bulk:
            loads.append(bulk_loop(url, key, work, budget, seconds, samples))
        await asyncio.gather(*loads)
        return Phase(clients, samples, time.perf_counter() - start)


async def warm_up(url: str, key: str, work: Workload) -> None:
    """One turn of each kind and a few searches, not counted: connections, replicas, first passes."""
    async with http_client(url, key, 1, REQUEST_TIMEOUT_S) as client:
        for kind in [*MIX, "search", "search", "search"]:
            await take_turn(kind, client, work, [])


async def measure(
    url: str, key: str, work: Workload, levels: Sequence[int], seconds: float, requests: int
) -> dict[str, Any]:
    """Search alone and with bulk embeddings, then every level of the mix; reported by
    :func:`summarize`. The bulk comparison comes first: a request a level's client gave up on
    may still hold the server's CPUs for a while, and would weigh on one side only."""
    alone = await search_phase(url, key, work, BULK_CLIENTS, seconds, requests, bulk=False)
    with_bulk = await search_phase(url, key, work, BULK_CLIENTS, seconds, requests, bulk=True)
    phases = []
    for clients in levels:
        phase = await run_level(url, key, work, clients, seconds, requests)
        report = phase_report(phase)
        log.info("%d clients: %d requests, %d errors, %.1f 2xx/s", clients, report["requests"],
                 report["errors"], report["ok_per_s"])  # fmt: skip
        phases.append(phase)
    return summarize(phases, alone, with_bulk, len(work.bulk))


# RUN
def load_bench_settings(base: Settings, key: str) -> Settings:
    """``base`` with an index and topics of the bench's own (it never touches the user's index)
    and ``key`` as the app's only API key, with both scopes."""
    topics = base.kafka.topics.model_copy(
        update={
            name: f"bench.{INDEX}.{name.replace('_', '-')}" for name in ("documents", "images", "dead_letter")
        }
    )
    auth = AuthConfig(keys=[ApiKey(key=SecretStr(key), scopes=["read", "write"], name=INDEX)])
    return base.model_copy(
        update={
            "index": base.index.model_copy(update={"name": INDEX}),
            "kafka": base.kafka.model_copy(update={"topics": topics}),
            "serve": base.serve.model_copy(update={"auth": auth}),
        }
    )


def command(dataset: Path, seconds: float, requests: int, mode: str, k: int) -> str:
    """The command line that repeats this run."""
    return (
        f"riverbed bench load --dataset {dataset} --seconds {seconds:g} --requests {requests} "
        f"--mode {mode} --k {k}"
    )


def bench_load(
    base: Settings,
    dataset: Path,
    seconds: float,
    requests: int,
    mode: str,
    k: int,
    out_dir: Path,
    levels: Sequence[int] = LEVELS,
) -> dict[str, Any]:
    """Runs the load described in this module's docstring; writes ``load.json``, ``load.md`` and
    ``load.png`` under ``out_dir`` and returns the JSON's content."""
    if not seconds > 0 or requests < 1:
        raise ConfigError(f"--seconds and --requests must be positive (got {seconds}, {requests})")
    key = secrets.token_urlsafe(32)
    settings = load_bench_settings(base, key)
    stats = build_index(settings, dataset / "corpus.jsonl", 1)
    questions = load_queries(dataset, QUERIES + BULK_INPUTS)
    work = Workload(questions[:QUERIES], questions[QUERIES:], mode, k)
    load_average = os.getloadavg()
    serving = start_serving(settings, ingest=True)
    try:
        chunks_before = wait_ready(serving.url)["chunks"]
        asyncio.run(warm_up(serving.url, key, work))
        result = asyncio.run(measure(serving.url, key, work, levels, seconds, requests))
        if serving.pipeline is not None:  # the posted and deleted documents, through ingest
            serving.pipeline.wait_idle(timeout_s=DRAIN_TIMEOUT_S)
        chunks_after = wait_ready(serving.url)["chunks"]
    finally:
        serving.stop()
    result = {
        "command": command(dataset, seconds, requests, mode, k),
        "machine": {**machine(), "load_average_before": [round(x, 2) for x in load_average]},
        "index": settings.index.name,
        "documents": stats["documents"],
        "chunks_before": chunks_before,
        "chunks_after": chunks_after,
        "mix": dict(MIX),
        "mode": mode,
        "k": k,
        "seconds": seconds,
        "requests_per_level": requests,
        **result,
    }
    result["summary"] = "; ".join(findings(result)) + f" (report in {out_dir}/load.md)"
    write_load_report(out_dir, result)
    return result
