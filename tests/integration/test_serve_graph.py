"""The knowledge graph's HTTP routes over real HTTP: Ray Serve in front of graph shards that the
real pipeline (Kafka, the spaCy extractor actor, two graph shards) filled from SQuAD passages.
What the routes answer is compared with the graph made directly from the same documents in this
process (the chunker, the extractor and document_graph), so every check has an independent side."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import networkx as nx
import pytest

from tests.integration.conftest import ServedIndex, served_index
from tests.integration.ingest_helpers import Fact, expected_graph

N_DOCS = 120
App = ServedIndex
LIMIT = 1000  # the routes' largest limit


@pytest.fixture(scope="module")
def app(broker, ray_session, tmp_path_factory) -> Iterator[App]:
    overrides = {"graph": {"enabled": True, "n_shards": 2}}
    with served_index(broker, tmp_path_factory, N_DOCS, prefix="graph", overrides=overrides) as served:
        yield served


class Expected:
    """The facts of the served documents' graphs, made in this process."""

    def __init__(self, mentions: Counter[Fact], relations: set[Fact]) -> None:
        self.mentions, self.relations = mentions, relations
        self.graph = nx.Graph()
        self.graph.add_edges_from((a, b) for _, a, b, _ in relations)
        self.labels: dict[str, Counter[str]] = defaultdict(Counter)
        for (_, key, label, _, _), n in mentions.items():
            self.labels[key][label] += n

    def neighbours(self, key: str) -> dict[tuple[str, str, str], set[str]]:
        rows: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for chunk, a, b, label in self.relations:
            if a == key:
                rows[(b, label, "out")].add(chunk)
            if b == key:
                rows[(a, label, "in")].add(chunk)
        return rows

    def mentions_of(self, key: str) -> Counter[tuple[str, str, int, int]]:
        return Counter(
            {
                (chunk, label, int(s), int(e)): n
                for (chunk, k, label, s, e), n in self.mentions.items()
                if k == key
            }
        )


@pytest.fixture(scope="module")
def expected(app: App) -> Expected:
    return Expected(*expected_graph(app.settings, list(app.docs.values())))


@pytest.fixture(scope="module")
def hub(expected: Expected) -> str:
    """A well-connected entity that is not a title: the one with the most neighbours under 300."""
    titles = {k for k, labels in expected.labels.items() if "TITLE" in labels}
    degrees = {k: d for k, d in expected.graph.degree() if k not in titles and d < 300}
    return max(degrees, key=lambda k: (degrees[k], k))


def test_entity_route_gives_exactly_the_mentions_and_relations_of_the_documents(app, http, expected, hub):
    r = http.get(f"/v1/graph/entities/{quote(hub)}", params={"limit": LIMIT})
    assert r.status_code == 200, r.text
    body = r.json()
    entity = body["entity"]
    want_mentions = expected.mentions_of(hub)
    assert entity["key"] == hub
    assert entity["degree"] == expected.graph.degree(hub)
    assert entity["mentions"] == sum(want_mentions.values())
    assert entity["label"] in expected.labels[hub]
    got = Counter((m["chunk_id"], m["label"], *m["span"]) for m in body["mentions"])
    assert got == want_mentions
    for m in body["mentions"]:  # spans point at the name as written, inside its sentence
        text = app.docs[m["document_id"]].text
        start, end = m["span"]
        assert text[start:end] == m["name"]
        assert m["sentence"][0] <= start < end <= m["sentence"][1]
        assert m["chunk_id"].startswith(m["document_id"] + "#")
    got_neighbours = {
        (n["entity"], n["relation"], n["direction"]): set(n["chunks"]) for n in body["neighbours"]
    }
    assert got_neighbours == expected.neighbours(hub)


def test_the_entity_route_takes_a_name_as_written_and_404s_an_unknown_one(app, http, expected, hub):
    [(chunk, _, start, end)] = list(expected.mentions_of(hub))[:1]
    written = app.docs[chunk.split("#")[0]].text[start:end].upper()  # any case, as a user types it
    r = http.get(f"/v1/graph/entities/{quote(written)}", params={"limit": 1})
    assert r.status_code == 200 and r.json()["entity"]["key"] == hub, r.text
    r = http.get("/v1/graph/entities/Nowhere%20Zqxjv")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["param"] == "name"


def test_entity_search_finds_entities_by_the_prefix_of_a_word(http, expected, hub):
    word = hub.split()[-1]
    prefix = word[: max(2, len(word) - 1)]
    r = http.get("/v1/graph/entities", params={"q": prefix, "limit": LIMIT})
    assert r.status_code == 200, r.text
    found = {e["key"]: e for e in r.json()["entities"]}
    want = {k for k in expected.labels if any(w.startswith(prefix) for w in k.split())}
    assert set(found) == want
    assert found[hub]["degree"] == expected.graph.degree(hub)
    degrees = [e["degree"] for e in r.json()["entities"]]
    assert degrees == sorted(degrees, reverse=True)


def test_a_two_hop_neighbourhood_is_the_documents_two_hop_neighbourhood(http, expected, hub):
    r = http.post("/v1/graph/query", json={"entity": hub, "hops": 2, "limit": LIMIT})
    assert r.status_code == 200, r.text
    body = r.json()
    want = nx.single_source_shortest_path_length(expected.graph, hub, cutoff=2)
    got = {n["key"]: n["distance"] for n in body["nodes"]}
    if len(want) <= LIMIT:
        assert got == want
    else:  # the nearest first: every one-hop neighbour, then some at two hops
        assert len(got) == LIMIT and all(want[k] == d for k, d in got.items())
    evidence: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for chunk, a, b, label in expected.relations:
        evidence[(a, b, label)].add(chunk)
    assert body["edges"]
    for edge in body["edges"]:
        assert edge["source"] in got and edge["target"] in got
        assert set(edge["chunks"]) == evidence[(edge["source"], edge["target"], edge["relation"])]


def test_paths_are_the_shortest_paths_with_their_evidence(http, expected, hub):
    distance = nx.single_source_shortest_path_length(expected.graph, hub, cutoff=2)
    target = min(k for k, d in distance.items() if d == 2)
    want = {tuple(p) for p in nx.all_shortest_paths(expected.graph, hub, target)}
    r = http.post(
        "/v1/graph/query", json={"path": {"from": hub, "to": target}, "max_hops": 4, "limit": LIMIT}
    )
    assert r.status_code == 200, r.text
    paths = r.json()["paths"]
    assert {tuple(p["nodes"]) for p in paths} == want
    for path in paths:
        assert len(path["steps"]) == len(path["nodes"]) - 1
        for (a, b), step in zip(
            zip(path["nodes"], path["nodes"][1:], strict=False), path["steps"], strict=True
        ):
            assert step, "every step names the relations that join its ends"
            for edge in step:
                assert {edge["source"], edge["target"]} == {a, b} and edge["chunks"]


@pytest.mark.parametrize(  # every refusal of a malformed body: tests/unit/test_api_requests.py
    ("body", "status", "code", "param"),
    [
        ({"entity": "x", "hops": 4}, 400, "invalid_request", "hops"),
        ({"entity": "Nowhere Zqxjv"}, 404, "not_found", "entity"),
        ({"path": {"from": "Nowhere Zqxjv", "to": "x"}}, 404, "not_found", "path.from"),
    ],
)
def test_bad_graph_queries_get_a_4xx_naming_the_field(http, body, status, code, param):
    r = http.post("/v1/graph/query", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == param


def test_an_unknown_path_end_is_a_404_naming_it(http, hub):
    r = http.post("/v1/graph/query", json={"path": {"from": hub, "to": "Nowhere Zqxjv"}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "path.to", r.text


def test_graph_search_explains_which_entities_brought_each_hit(app, http, expected):
    question = "Which NFL team represented the AFC at Super Bowl 50?"
    r = http.post("/v1/search", json={"query": question, "k": 5, "mode": "graph", "explain": True})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert "Super_Bowl_50_0000" in [h["document_id"] for h in hits]
    from_graph = [h for h in hits if h["explanation"]["graph_rank"] is not None]
    assert from_graph, "the graph ranked some of the hits"
    for hit in from_graph:
        assert hit["explanation"]["graph_entities"]
        assert set(hit["explanation"]["graph_entities"]) <= set(expected.labels)
        assert hit["text"] == app.docs[hit["document_id"]].text[hit["span"][0] : hit["span"][1]]


def _entity_status(http: httpx.Client, name: str, status: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = http.get(f"/v1/graph/entities/{quote(name)}")
        if r.status_code == status:
            return r.json()
        time.sleep(0.5)
    raise AssertionError(f"entity {name!r} did not answer {status} within {timeout_s} s")


def test_posted_updates_and_deletes_change_the_graph(http):
    doc_id = f"posted-{uuid.uuid4().hex[:6]}"
    text = "The company builds clocks in a workshop by the harbour."  # the title is its only entity
    post = {"kind": "document", "id": doc_id, "title": "Quillfeather Labs", "text": text}
    assert http.post("/v1/documents", json=post).status_code == 202
    found = _entity_status(http, "Quillfeather Labs", 200)
    assert found["entity"]["label"] == "TITLE"
    assert {m["document_id"] for m in found["mentions"]} == {doc_id}
    # an update under another title: the old title's entity loses its only provenance and goes
    assert http.post("/v1/documents", json={**post, "title": "Quillfeather Works"}).status_code == 202
    _entity_status(http, "Quillfeather Works", 200)
    _entity_status(http, "Quillfeather Labs", 404)
    assert http.delete(f"/v1/documents/{doc_id}").status_code == 202
    _entity_status(http, "Quillfeather Works", 404)


def test_a_graph_shard_gone_degrades_health_naming_it_while_search_goes_on(app, http, hub):
    """Last in the module: it stops graph shard 1 for good, then starts it again from its store."""
    import ray

    from cluster.pipeline import open_graph_shards
    from schemas.topology import actor_name

    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    side = app.settings.graph_side()
    name = actor_name(side.index.name, "shard", 1)
    ray.kill(ray.get_actor(name, namespace=side.ray.namespace), no_restart=True)
    r = http.get("/healthz")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "degraded" and body["error"]["code"] == "index_degraded", body
    assert [p for p in body["problems"] if p.startswith("graph shard 1: unavailable")], body["problems"]
    assert not [p for p in body["problems"] if p.startswith("shard ")], "the text shards are fine"
    assert http.post("/v1/search", json={"query": hub, "mode": "hybrid"}).status_code == 200
    open_graph_shards(app.settings)  # from its store, checked against the group's offsets
    deadline = time.monotonic() + 60
    while (r := http.get("/healthz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert http.get(f"/v1/graph/entities/{quote(hub, safe='')}").status_code == 200
