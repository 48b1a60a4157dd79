"""The HTTP app over real HTTP: Ray Serve in front of shards filled by the real pipeline from SQuAD
passages, the real MiniLM query embedder and the real SmolLM2 generator."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.integration.conftest import ServedIndex, served_index

N_DOCS = 400
App = ServedIndex


# serve.embeddings.max_request_tokens of the app: low enough that a request over it fits in the
# fixture's 64 KiB bodies, high enough for serve.embeddings.max_inputs one-word inputs.
EMBEDDING_TOKENS = 8192


@pytest.fixture(scope="module")
def app(broker, ray_session, tmp_path_factory) -> Iterator[App]:
    overrides = {"embeddings": {"max_request_tokens": EMBEDDING_TOKENS}}
    with served_index(broker, tmp_path_factory, N_DOCS, prefix="serve", serve_overrides=overrides) as served:
        yield served


QUESTION = "Which NFL team represented the AFC at Super Bowl 50?"  # gold: Super_Bowl_50_0000
GOLD = "Super_Bowl_50_0000"


def check_hit(app: App, hit: dict) -> None:
    doc = app.docs[hit["document_id"]]
    start, end = hit["span"]
    assert doc.text[start:end] == hit["text"], "a hit's span must point at its text in the document"
    assert hit["chunk_id"].startswith(hit["document_id"] + "#")
    assert hit["title"] == doc.title
    assert hit["metadata"] == dict(doc.metadata)


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_finds_the_gold_passage_in_every_mode(app, http, mode):
    r = http.post("/v1/search", json={"query": QUESTION, "k": 5, "mode": mode})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == mode and body["k"] == 5 and len(body["hits"]) == 5
    assert GOLD in [h["document_id"] for h in body["hits"]]
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["hits"]:
        check_hit(app, hit)


def test_keyword_hits_contain_a_query_word(http):
    hits = http.post("/v1/search", json={"query": "Broncos", "k": 5, "mode": "keyword"}).json()["hits"]
    assert hits and all("bronco" in h["text"].lower() for h in hits)


def test_filters_equality_range_and_in(app, http):
    r = http.post(
        "/v1/search",
        json={"query": "football championship game", "k": 10, "filter": {"title": "Super Bowl 50"}},
    )
    hits = r.json()["hits"]
    assert hits and all(h["metadata"]["title"] == "Super Bowl 50" for h in hits)
    r = http.post(
        "/v1/search",
        json={"query": "history", "k": 20, "mode": "vector", "filter": {"position": {"gte": 100, "lt": 120}}},
    )
    positions = [h["metadata"]["position"] for h in r.json()["hits"]]
    assert positions and all(100 <= p < 120 for p in positions)
    titles = ["Warsaw", "Normans"]
    r = http.post("/v1/search", json={"query": "city", "k": 10, "filter": {"title": {"in": titles}}})
    assert {h["metadata"]["title"] for h in r.json()["hits"]} <= set(titles)


def test_explain_gives_the_score_breakdown(app, http):
    r = http.post("/v1/search", json={"query": QUESTION, "k": 3, "mode": "hybrid", "explain": True})
    top = r.json()["hits"][0]
    ex = top["explanation"]
    assert ex["fused_score"] == pytest.approx(top["score"])
    assert ex["vector_rank"] is not None or ex["keyword_rank"] is not None
    assert ex["matched_terms"]
    for term in ex["matched_terms"]:
        assert app.docs[top["document_id"]].text[term["start"] : term["end"]] == term["term"]
        assert top["text"][term["text_start"] : term["text_end"]] == term["term"]


def test_rag_answers_with_citations_that_point_at_real_text(app, http):
    r = http.post("/v1/rag", json={"question": QUESTION, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["passages"] and body["model"]
    if not body["abstained"]:
        assert body["answer"].strip()
        assert body["citations"], "an answer cites the passages it used"
    for citation in body["citations"]:
        doc = app.docs[citation["document_id"]]
        start, end = citation["span"]
        assert 0 <= start < end <= len(doc.text)
        assert doc.text[start:end] in citation["text"] or citation["text"] in doc.text
        assert citation["chunk_id"] in {p["chunk_id"] for p in body["passages"]}


def test_rag_abstains_when_the_corpus_cannot_answer(http):
    r = http.post(
        "/v1/rag", json={"question": "What torque should a carbon bicycle seatpost clamp bolt get?"}
    )
    body = r.json()
    assert r.status_code == 200 and body["abstained"] is True
    assert body["citations"] == [] and body["reason"]


def test_embeddings_with_the_official_openai_client(app, http):
    import openai

    from actors.embedder import Embedder

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused")
    texts = ["The Broncos won Super Bowl 50.", "Warsaw is the capital of Poland."]
    response = client.embeddings.create(model=app.settings.embed.model, input=texts)  # base64 on the wire
    assert [d.index for d in response.data] == [0, 1]
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    embedder = Embedder(app.settings.embed.model_copy(update={"num_cpus": 1}))
    expected = embedder.embed(texts)
    assert got.shape == (2, embedder.dim)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert response.usage.prompt_tokens == sum(embedder.count_tokens(texts))
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(np.array(floats.data[0].embedding, np.float32), expected[0], atol=1e-4)
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_the_official_openai_client_lists_the_models_the_embeddings_and_rag_answers_name(app, http):
    import openai

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused")
    listed = [m.id for m in client.models.list()]
    embedded = client.embeddings.create(model=listed[0], input="Warsaw").model
    answered = http.post("/v1/rag", json={"question": QUESTION, "k": 1}).json()["model"]
    assert listed == [embedded, answered]


def _wait_for(http: httpx.Client, doc_id: str, indexed: bool, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = http.get(f"/v1/documents/{doc_id}").json()
        if status["indexed"] is indexed:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{doc_id} did not become indexed={indexed} within {timeout_s} s")


def test_posted_documents_become_searchable_and_deletes_remove_them(app, http):
    doc_id = f"posted-{uuid.uuid4().hex[:6]}"
    text = "The quokka is a small marsupial that lives on Rottnest Island near Perth."
    r = http.post("/v1/documents", json={"kind": "document", "id": doc_id, "title": "Quokka", "text": text})
    assert r.status_code == 202, r.text
    [record] = r.json()["records"]
    assert record["topic"] == app.settings.kafka.topics.documents and record["offset"] >= 0
    status = _wait_for(http, doc_id, indexed=True)
    assert status["chunks"] == 1
    assert (
        status["source"]["offset"] == record["offset"]
        and status["source"]["partition"] == record["partition"]
    )
    hits = http.post("/v1/search", json={"query": "quokka marsupial island", "k": 1}).json()["hits"]
    assert hits[0]["document_id"] == doc_id and hits[0]["text"] == text
    r = http.delete(f"/v1/documents/{doc_id}")
    assert r.status_code == 202 and r.json()["records"][0]["op"] == "delete"
    assert _wait_for(http, doc_id, indexed=False)["chunks"] == 0
    hits = http.post("/v1/search", json={"query": "quokka marsupial island", "k": 3}).json()["hits"]
    assert doc_id not in [h["document_id"] for h in hits]


def test_documents_endpoint_rejects_bad_envelopes_naming_them(http):
    r = http.post(
        "/v1/documents",
        json=[{"kind": "document", "id": "ok", "text": "fine"}, {"kind": "document", "id": "x"}],
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_envelope" and error["param"] == "documents[1]"
    assert "text" in error["message"]


BAD_REQUESTS = [
    ("malformed json", "/v1/search", b'{"query": "x",', 400, "invalid_json", None),
    ("wrong type", "/v1/search", {"query": "x", "k": "many"}, 400, "invalid_request", "k"),
    ("empty query", "/v1/search", {"query": ""}, 400, "invalid_request", "query"),
    ("blank query", "/v1/search", {"query": "   "}, 400, "invalid_request", "query"),
    ("missing query", "/v1/search", {"k": 3}, 400, "invalid_request", "query"),
    ("k zero", "/v1/search", {"query": "x", "k": 0}, 400, "invalid_request", "k"),
    ("k too big", "/v1/search", {"query": "x", "k": 100000}, 400, "invalid_request", "k"),
    ("bad mode", "/v1/search", {"query": "x", "mode": "fuzzy"}, 400, "invalid_request", "mode"),
    ("unknown field", "/v1/search", {"query": "x", "fliter": {}}, 400, "invalid_request", "fliter"),
    (
        "unknown filter field",
        "/v1/search",
        {"query": "x", "filter": {"yeer": 2000}},
        400,
        "invalid_request",
        "filter",
    ),
    (
        "bad filter op",
        "/v1/search",
        {"query": "x", "filter": {"position": {"bigger": 3}}},
        400,
        "invalid_request",
        None,
    ),
    ("rag empty question", "/v1/rag", {"question": ""}, 400, "invalid_request", "question"),
    ("rag k too big", "/v1/rag", {"question": "why", "k": 5000}, 400, "invalid_request", "k"),
    ("embeddings empty list", "/v1/embeddings", {"input": []}, 400, "invalid_request", "input"),
    ("embeddings token ids", "/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "invalid_request", None),
    ("documents not json", "/v1/documents", b"nope", 400, "invalid_json", None),
    ("documents nested too deeply", "/v1/documents", b"[" * 50_000, 400, "invalid_json", None),
]


# Bodies that pass a lenient parser but no store could hold (defect: the int reached the stream and
# killed ingest): each is a 400 whose message names the field (or the literal) and the problem.
def _doc(**fields) -> dict:
    return {"kind": "document", "id": "n", "text": "x", **fields}


def _json(value) -> bytes:
    # Python's encoder writes NaN/Infinity literals and escapes lone surrogates (\\ud800), as a
    # careless producer would; the app must refuse both.
    return json.dumps(value).encode()


UNSTORABLE = [
    ("NaN literal", _json(_doc(metadata={"score": math.nan})), "invalid_json", None, ["NaN"]),
    ("Infinity literal", _json(_doc(metadata={"score": -math.inf})), "invalid_json", None, ["Infinity"]),
    ("overflowing float", b'{"kind": "document", "id": "n", "text": "x", "metadata": {"score": 1e999}}',
     "invalid_json", None, ["1e999"]),
    ("int over int64", _json(_doc(metadata={"huge_count": 2**63})), "invalid_envelope",
     "documents[0].metadata.huge_count", ["huge_count", str(2**63)]),
    ("int under int64", _json([_doc(id="ok"), _doc(metadata={"low": -(2**63) - 1})]), "invalid_envelope",
     "documents[1].metadata.low", ["low"]),
    ("surrogate in title", _json(_doc(title="bad \ud800 title")), "invalid_envelope", "documents[0].title",
     ["title", "surrogate"]),
    ("surrogate in text", _json(_doc(text="x \udc00 y")), "invalid_envelope", "documents[0].text",
     ["text", "surrogate"]),
    ("surrogate in metadata", _json(_doc(metadata={"tag": "\ud83d"})), "invalid_envelope",
     "documents[0].metadata.tag", ["tag", "surrogate"]),
    ("surrogate in id", _json(_doc(id="s\ud800")), "invalid_envelope", "documents[0].id",
     ["id", "surrogate"]),
]  # fmt: skip


@pytest.mark.parametrize("name,body,code,param,words", UNSTORABLE, ids=[u[0] for u in UNSTORABLE])
def test_documents_no_store_could_hold_are_refused_naming_the_field(http, name, body, code, param, words):
    r = http.post("/v1/documents", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == param, error
    for word in words:
        assert word in error["message"], error


@pytest.mark.parametrize("name,path,body,status,code,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_naming_the_field(http, name, path, body, status, code, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_a_body_over_the_limit_gets_413(http):
    r = http.post("/v1/search", json={"query": "x" * (70 * 1024)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_an_app_served_without_its_graph_says_so_and_never_answers_5xx(app, http):
    """This app's settings leave graph.enabled off: the graph routes are not there (404) and graph
    mode is a mode it cannot search in (400), each naming graph.enabled, rather than a 503 that
    tells a client to retry something that will never work."""
    assert not app.settings.graph.enabled
    answers = [
        http.get("/v1/graph/entities", params={"q": "nor"}),
        http.get("/v1/graph/entities/Normandy"),
        http.post("/v1/graph/query", json={"entity": "Normandy", "hops": 1}),
        http.post("/v1/graph/query", json={"path": {"from": "Normandy", "to": "France"}}),
    ]
    for r in answers:
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "not_found" and "graph.enabled" in error["message"], error
    for route, field in (("/v1/search", "query"), ("/v1/rag", "question")):
        r = http.post(route, json={field: QUESTION, "mode": "graph"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "mode" and "graph.enabled" in error["message"], error


def test_evaluating_graph_mode_on_an_index_without_a_graph_is_refused_naming_it(app):
    """`riverbed eval retrieval --index NAME --set graph.enabled=true` on this graph-less index."""
    from cluster.eval.retrieval import open_index
    from schemas.errors import ConfigError
    from schemas.settings import load_settings

    settings = load_settings(overrides={**app.settings.model_dump(mode="json"), "graph": {"enabled": True}})
    with pytest.raises(ConfigError, match=f"index '{app.settings.index.name}' has no knowledge graph"):
        open_index(settings, None)


def test_unknown_routes_and_methods_keep_the_error_shape(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.get("/v1/search")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_health_metrics_and_docs(app, http):
    health = http.get("/healthz")
    body = health.json()
    assert health.status_code == 200, body
    assert body["status"] == "ok" and body["problems"] == [] and body["shards"] == 2
    assert body["chunks"] > N_DOCS and body["sources"] == app.settings.ingest.sources
    http.post("/v1/search", json={"query": "warsaw", "k": 1})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    counted = [line for line in text.splitlines() if line.startswith("riverbed_http_requests_total{")]
    assert any('method="POST",route="/v1/search",status="200"' in line for line in counted), counted
    assert "riverbed_http_request_duration_seconds_bucket" in text
    batches = {  # the search above went through both stages of the ingress's own retriever
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("riverbed_query_batch_size_count{")
    }
    assert batches.get('stage="embed"', 0) >= 1 and batches.get('stage="search"', 0) >= 1, batches
    assert f'riverbed_consumer_lag{{index="{app.settings.index.name}"' in text
    index = app.settings.index.name
    assert f'riverbed_index_chunks{{index="{index}",shard="0"}}' in text
    assert f'riverbed_index_vectors{{index="{index}",shard="1"}}' in text
    assert f'riverbed_shard_status{{index="{index}",shard="1",status="ok"}} 1.0' in text
    assert f'riverbed_ingest_stalled{{index="{index}",' in text
    assert http.get("/docs").status_code == 200
    assert "/v1/search" in http.get("/openapi.json").json()["paths"]


def test_an_index_without_shards_is_unavailable(app, ray_session):
    from deployments.retriever import RayShards
    from schemas.errors import IndexUnavailableError

    other = app.settings.model_copy(
        update={"index": app.settings.index.model_copy(update={"name": "nothing-here"})}
    )
    with pytest.raises(IndexUnavailableError, match="not ready"):
        RayShards(other).handles()


def test_riverbed_explain_prints_the_breakdown_from_the_running_app(app, capsys):
    from cluster.cli import main

    port = app.url.rsplit(":", 1)[1]
    assert main(["--set", f"serve.port={port}", "explain", "Tesla induction motor", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hybrid search for 'Tesla induction motor': 3 hits")
    assert "vector #" in out and "keyword #" in out and "BM25" in out
    assert "[Tesla]" in out or "[motor]" in out  # matched words are marked in the text


def test_riverbed_explain_without_an_app_says_how_to_start_one(app, capsys):
    from cluster.cli import main

    assert main(["--set", "serve.port=1", "explain", "anything"]) == 1
    assert "riverbed serve" in capsys.readouterr().err


def test_explained_terms_of_a_messy_posted_document_point_at_its_own_text(http):
    """CRLF, whitespace runs, NFD accents and a control inside a word: the chunk's text is cleaned,
    yet each matched term's offsets slice the posted text to that word as it was sent."""
    doc_id = f"messy-{uuid.uuid4().hex[:6]}"
    text = "Le  cafe\u0301\r\n\r\nde   la\tplace:  un   wombat\u00a0 et\r\nun quok\x07ka   ve\u0301ritable."
    r = http.post("/v1/documents", json={"kind": "document", "id": doc_id, "text": text})
    assert r.status_code == 202, r.text
    _wait_for(http, doc_id, indexed=True)
    body = {"query": "café wombat quokka véritable", "k": 5, "mode": "keyword", "explain": True}
    hits = http.post("/v1/search", json=body).json()["hits"]
    [hit] = [h for h in hits if h["document_id"] == doc_id]
    assert hit["text"] == "Le café\n\nde la place: un wombat et un quokka véritable."
    terms = hit["explanation"]["matched_terms"]
    written = {t["term"]: text[t["start"] : t["end"]] for t in terms}
    assert written == {
        "café": "cafe\u0301",
        "wombat": "wombat",
        "quokka": "quok\x07ka",
        "véritable": "ve\u0301ritable",
    }
    assert all(hit["text"][t["text_start"] : t["text_end"]] == t["term"] for t in terms)
    assert http.delete(f"/v1/documents/{doc_id}").status_code == 202


LAX_OR_UNSTORABLE = [  # each was read as something else, or reached a shard and failed there
    ("k true", "/v1/search", b'{"query": "x", "k": true}', "k"),
    ("k a string", "/v1/search", b'{"query": "x", "k": "5"}', "k"),
    ("explain a number", "/v1/search", b'{"query": "x", "explain": 1}', "explain"),
    ("rag k true", "/v1/rag", b'{"question": "why", "k": true}', "k"),
    ("dimensions a string", "/v1/embeddings", b'{"input": "x", "dimensions": "384"}', "dimensions"),
    ("surrogate in a filter value", "/v1/search", b'{"query": "x", "filter": {"title": "\\ud800"}}',
     "filter"),
    ("filter int over int64", "/v1/search", b'{"query": "x", "filter": {"position": 9223372036854775808}}',
     "filter"),
    ("filter NaN", "/v1/search", b'{"query": "x", "filter": {"position": {"gt": NaN}}}', "filter"),
    ("surrogate in an input", "/v1/embeddings", b'{"input": ["ok", "\\udc00"]}', "input"),
    ("nested too deeply", "/v1/search", b"[" * 60_000, None),  # under serve.max_body_bytes
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,param", LAX_OR_UNSTORABLE, ids=[b[0] for b in LAX_OR_UNSTORABLE])
def test_lax_or_unstorable_request_values_are_400_naming_the_field(http, name, path, body, param):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    expected_code = "invalid_json" if param is None else "invalid_request"
    assert error["param"] == param and error["code"] == expected_code, error


def test_a_path_id_that_is_not_utf8_is_refused_not_replaced(http):
    # %ED%A0%80 are a lone surrogate's bytes; decoded leniently they become U+FFFD x 3, an id the
    # client never sent, whose delete would be produced with a 202.
    for method in ("DELETE", "GET"):
        r = http.request(method, "/v1/documents/%ED%A0%80")
        assert r.status_code == 400, (method, r.text)
        error = r.json()["error"]
        assert error["param"] == "document_id" and "not UTF-8" in error["message"], error
    r = http.delete("/v1/documents/ok%00id")
    assert r.status_code == 400 and r.json()["error"]["param"] == "document_id", r.text


# -- /v1/embeddings: its own deployment and budgets ------------------------------------------------


@pytest.fixture(scope="module")
def minilm(app: App):
    """The app's model loaded here: an independent path to the vectors the app should answer."""
    from actors.embedder import Embedder

    embedder = Embedder(app.settings.embed.model_copy(update={"num_cpus": 1}))
    embedder.warm_up()
    return embedder


def _passages_over(app: App, minilm, tokens: int) -> tuple[list[str], list[int]]:
    """The ingested passages, in order, up to the first whose tokens take the total past ``tokens``."""
    texts: list[str] = []
    for doc in app.docs.values():
        texts.append(doc.text)
        counts = minilm.count_tokens(texts)
        if sum(counts) > tokens:
            return texts, counts
    raise AssertionError(f"the corpus holds fewer than {tokens} tokens")


def _vectors(body: dict) -> np.ndarray:
    import base64

    rows = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    if rows and isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.array(rows, dtype=np.float32)


def _ask(deployment: str, method: str, *calls: tuple) -> list:
    """``method`` of the app's ``deployment`` called once per argument tuple in ``calls``, through
    a Serve handle."""
    from ray import serve

    from deployments.app import APP_NAME

    handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
    # Throughput-optimized Serve routes a driver's handle on the caller's event loop; a test has
    # none, so the router gets its own (Serve's default outside that mode).
    handle._init(_run_router_in_separate_loop=True)
    return [getattr(handle, method).remote(*args).result() for args in calls]


def test_embeddings_over_the_token_budget_get_a_400_naming_the_setting(app, http, minilm):
    texts, counts = _passages_over(app, minilm, EMBEDDING_TOKENS)
    r = http.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "input", error
    assert "serve.embeddings.max_request_tokens" in error["message"], error
    assert f"{sum(counts)} tokens" in error["message"] and f"at most {EMBEDDING_TOKENS}" in error["message"]
    # One passage fewer is within the budget, and its usage is what the model's tokenizer counts.
    r = http.post("/v1/embeddings", json={"input": texts[:-1], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == sum(counts[:-1]) <= EMBEDDING_TOKENS
    np.testing.assert_allclose(_vectors(r.json()), minilm.embed(texts[:-1]), atol=1e-5)


def test_embeddings_take_max_inputs_and_refuse_one_more_naming_the_limit(app, http, minilm):
    limit = app.settings.serve.embeddings.max_inputs
    r = http.post("/v1/embeddings", json={"input": ["x"] * (limit + 1)})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and f"{limit + 1} items; at most {limit}" in error["message"], error
    assert "serve.embeddings.max_inputs" in error["message"], error
    # The largest request, as floats: a body of megabytes, past what Serve's gRPC carries by default.
    r = http.post("/v1/embeddings", json={"input": ["x"] * limit, "encoding_format": "float"})
    assert r.status_code == 200, r.text[:500]
    vectors = _vectors(r.json())
    assert vectors.shape == (limit, minilm.dim)
    np.testing.assert_allclose(vectors, np.broadcast_to(minilm.embed(["x"]), vectors.shape), atol=1e-5)


def test_embeddings_are_the_vectors_search_embeds_queries_with(app, http, minilm):
    passages, _ = _passages_over(app, minilm, 3000)  # several forward passes of the bulk replica
    texts = [QUESTION, "Warsaw", *passages]
    floats = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
    packed = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
    assert floats.status_code == packed.status_code == 200, (floats.text[:300], packed.text[:300])
    got = _vectors(floats.json())
    np.testing.assert_array_equal(got, _vectors(packed.json()))  # one vector, two encodings
    np.testing.assert_allclose(got, minilm.embed(texts), atol=1e-5)
    picked = [0, 1, len(texts) - 1]
    searched = _ask("Ingress", "embed_query", *[(texts[i],) for i in picked])  # what /v1/search embeds
    np.testing.assert_allclose(got[picked], np.stack(searched), atol=1e-5)


def test_the_bulk_embedder_computes_on_one_niced_torch_thread(app):
    from deployments.bulk_embedder import BULK_NICE

    [described] = _ask("BulkEmbedder", "describe", ())
    assert described["model"] == app.settings.embed.model
    assert described["torch_threads"] == app.settings.serve.embedder_threads == 1
    assert described["worker_nice"] == BULK_NICE
