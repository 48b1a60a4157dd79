"""`riverbed demo` / `make demo`: the main job end to end on embedded defaults.

# BROKER: start (or reuse) the embedded Kafka, create the topics
# RAY: start (or reuse) the local Ray head
# IMAGE MODEL: Riverbed's image-text model, trained on easy-vqa's train split when the cache has
#              none (a few minutes on CPU, progress shown); skipped when images.ingest is false
# PRODUCE: the sample corpus onto the documents topic, and easy-vqa test images (with their
#          captions) onto the images topic, keyed by id
# INGEST: Kafka → chunk → embed → shards until every record is committed (images beside the text;
#         the knowledge graph too, in its own consumer group: on unless graph.enabled is set false)
# STATS: what the index (and its graph) now holds, read from the stores and the broker
# SERVE: the HTTP app on the same shards (ingest keeps running: posted documents get indexed)
# QUERIES: three searches and one RAG question over HTTP, then text → image searches and the
#          knowledge graph (an entity, a path, a graph-mode search), printed with their real answers
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cluster.graph_files import graph_stats
from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import GraphModelChangedError, Pipeline, Progress, reset_graph
from cluster.producer import EnvelopeProducer, read_records
from cluster.ray_runtime import connect
from cluster.serving import start_serving
from cluster.stats import index_stats
from schemas.envelope import ImageEnvelope
from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


SAMPLE_SEARCHES: list[dict[str, Any]] = [
    {"query": "Which NFL team represented the AFC at Super Bowl 50?", "k": 3, "mode": "vector"},
    {"query": "Tesla alternating current induction motor patents", "k": 3, "mode": "keyword"},
    {"query": "Who led the Norman conquest?", "k": 3, "mode": "hybrid", "filter": {"title": "Normans"}},
]
SAMPLE_QUESTION = {"question": "Where did Super Bowl 50 take place?", "k": 3}
SAMPLE_ENTITY = "Nikola Tesla"
PATH_ENDS = ("Nikola Tesla", "Thomas Edison")
SAMPLE_PATH = {"path": {"from": PATH_ENDS[0], "to": PATH_ENDS[1]}, "max_hops": 3, "limit": 2}
SAMPLE_GRAPH_SEARCH = {
    "query": "Which company bought the patents of the inventor of the induction motor?",
    "k": 3,
    "mode": "graph",
    "explain": True,
}
DEMO_IMAGES = 300
"""easy-vqa test images the demo ingests (never seen in training)."""
SAMPLE_IMAGE_QUERIES: list[dict[str, Any]] = [
    {"query": "a red circle", "k": 5},
    {"query": "a blue triangle", "k": 5},
    {"query": "a gray rectangle", "k": 5},
]


def demo_settings(settings: Settings, graph_chosen: bool) -> Settings:
    """The demo builds the knowledge graph unless ``graph.enabled`` was chosen (``graph_chosen``:
    given with ``--set`` or in the environment), whatever it was chosen to be."""
    if graph_chosen:
        return settings
    return settings.model_copy(update={"graph": settings.graph.model_copy(update={"enabled": True})})


def run_demo(settings: Settings, sample: Path, json_output: bool = False, keep_serving: bool = False) -> int:
    corpus = sample / "corpus.jsonl" if sample.is_dir() else sample
    if not corpus.exists():
        raise ConfigError(f"sample corpus {corpus} not found (run from the repository root, or pass --data)")
    t0 = time.monotonic()

    # BROKER
    servers = bootstrap_servers(settings)
    topics = settings.kafka.topics
    ensure_topics(servers, topic_specs(topics), max_message_bytes=settings.kafka.max_record_bytes)
    _say(f"Kafka    {servers}  (ready in {time.monotonic() - t0:.1f} s)")

    # RAY
    address = connect(settings)
    import ray

    _say(f"Ray      {address}  ({ray.cluster_resources().get('CPU', 0):g} logical CPUs)")

    # IMAGE MODEL
    images = _image_model(settings)

    # PRODUCE
    producer = EnvelopeProducer(servers, settings.kafka.max_record_bytes)
    sent = skipped = images_sent = 0
    try:
        for record in read_records(corpus):
            if record.envelope is None:
                skipped += 1
                log.warning("skipped %s: %s", record.location, record.error)
                continue
            producer.send(topics.documents, record.envelope)
            sent += 1
        if images:
            for envelope in _demo_images():
                producer.send(topics.images, envelope)
                images_sent += 1
        producer.flush()
    finally:
        producer.close()
    _say(f"Produced {sent} documents to {topics.documents}, skipped {skipped}")
    if images:
        _say(f"Produced {images_sent} easy-vqa test images to {topics.images}")

    # INGEST
    pipeline = Pipeline(settings)
    try:
        pipeline.start()
    except GraphModelChangedError as exc:  # the demo owns its index: its graph is rebuilt
        _say(f"{exc}\n  The demo's graph is built again from the topic (riverbed graph reset)")
        reset_graph(settings)
        pipeline = Pipeline(settings)
        pipeline.start()

    def show(p: Progress) -> None:
        print(
            f"\r  ingest [{p.elapsed_s:5.1f}s] documents {p.total('documents', 'document')}  unchanged "
            f"{p.total('unchanged', 'document')}  chunks {p.total('chunks', 'document')}"
            + (f"  images {p.total('images')}" if pipeline.images else "")
            + (f"  graph mentions {p.total('mentions')}" if pipeline.graph_shards else "")
            + f"  lag {p.lag}   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    try:
        progress = pipeline.wait_idle(on_progress=show, interval_s=0.5)
    except BaseException:
        pipeline.stop()
        raise
    print(file=sys.stderr)
    _say(
        f"Ingested: {progress.total('chunks', 'document')} chunks embedded, "
        f"{progress.total('unchanged', 'document')} documents "
        "unchanged since the last run"
    )

    # STATS
    stats = index_stats(settings)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    if json_output:
        print(json.dumps(stats, indent=2))
    else:
        print(
            f"index {stats['index']}: {stats['documents']} documents, {stats['chunks']} chunks "
            f"(per shard {stats['chunks_per_shard']}), {stats['images']} images, dead letters "
            f"{stats['dead_letters']['total']}, lag {stats['lag']}, in {stats['seconds']} s"
        )
    ok = stats["lag"] == 0 and stats["documents"] >= sent and stats["images"] >= images_sent
    if pipeline.graph_shards:
        graph = graph_stats(settings, top=5)
        top = ", ".join(f"{e['name']} ({e['degree']})" for e in graph["top_entities"])
        if json_output:
            print(json.dumps({"graph": graph}, indent=2))
        else:
            print(
                f"graph: {graph['entities']} entities, {graph['edges']} edges "
                f"({graph['edges_per_chunk']} per chunk) from {graph['mentions']} mentions; "
                f"most connected: {top}"
            )
        ok = ok and graph["entities"] > 0

    # SERVE
    serving = start_serving(settings, ingest=True, pipeline=pipeline)
    try:
        _say(f"Serving  {serving.url}  (docs: {serving.url}/docs)")
        # QUERIES
        with httpx.Client(base_url=serving.url, timeout=300) as http:
            for body in SAMPLE_SEARCHES:
                response = http.post("/v1/search", json=body)
                ok = ok and response.status_code == 200
                _print_search(body, response.json(), json_output)
            response = http.post("/v1/rag", json=SAMPLE_QUESTION)
            ok = ok and response.status_code == 200
            _print_rag(SAMPLE_QUESTION, response.json(), json_output)
            if pipeline.images:
                for body in SAMPLE_IMAGE_QUERIES:
                    response = http.post("/v1/images/search", json=body)
                    ok = ok and response.status_code == 200
                    _print_image_search(body, response.json(), json_output)
            if pipeline.graph_shards:
                ok = _graph_queries(http, json_output) and ok
        print(_curl_lines(serving.url, images=pipeline.images, graph=bool(pipeline.graph_shards)))
        if keep_serving:
            _say("Serving until Ctrl-C (ingest keeps running: POST /v1/documents to add more)")
            _wait_for_signal()
    finally:
        serving.stop()
    return 0 if ok else 1


def _image_model(settings: Settings) -> bool:
    """Whether the demo ingests images: not when ``images.ingest`` is false; else Riverbed's own
    model is trained first when the cache has none (any other model is used as it is)."""
    from actors.models import TRAINED_MODELS, trained_image_model_dir
    from cluster.finetune_image_text import finetune_image_text

    if settings.images.ingest is False:
        return False
    model = settings.images.model
    if model not in TRAINED_MODELS:
        return True
    if trained_image_model_dir(settings.images, settings.embed.model, settings.cache_dir).is_dir():
        _say(f"Images   model {model} found in the cache")
        return True
    _say(f"Images   training {model} on {TRAINED_MODELS[model]}'s train split (once; cached after)")

    def show(event: dict[str, Any]) -> None:
        if event["kind"] != "epoch":
            return
        val = event.get("val_caption_accuracy")
        _say(
            f"  epoch {event['epoch']}/{event['epochs']} in {event['epoch_s']:.0f} s: "
            f"loss {event['loss']:.3f}"
            + (f", validation caption accuracy {val:.3f}" if val is not None else "")
        )

    result = finetune_image_text(settings, TRAINED_MODELS[model], on_progress=show)
    _say(f"  trained in {result.record.train_seconds:.0f} s: {result.path}")
    return True


def _demo_images() -> Iterator[ImageEnvelope]:
    """The first :data:`DEMO_IMAGES` captioned easy-vqa test images as inline image envelopes."""
    from cluster.image_datasets import load_image_dataset

    for item in load_image_dataset("easy-vqa", "test", limit=DEMO_IMAGES).items:
        yield ImageEnvelope(
            id=f"easy-vqa-test-{item.id}",
            image_b64=base64.b64encode(item.path.read_bytes()).decode(),
            caption=item.caption,
            metadata={"source": "easy-vqa", "split": "test"},
        )


def _shown(title: str, body: dict[str, Any], answer: dict[str, Any], json_output: bool) -> bool:
    """Prints the exchange whole (``json_output``), or its title line and any error; True when
    the caller should print the answer itself."""
    if json_output:
        print(json.dumps({"request": body, "response": answer}, indent=2))
        return False
    print(f"\n{title}")
    if "error" in answer:
        print(f"  error: {answer['error']}")
        return False
    return True


def _print_search(body: dict[str, Any], answer: dict[str, Any], json_output: bool) -> None:
    where = f", filter {json.dumps(body['filter'])}" if "filter" in body else ""
    if not _shown(
        f"POST /v1/search  {body['query']!r}  (mode {body['mode']}{where})", body, answer, json_output
    ):
        return
    for i, hit in enumerate(answer["hits"], 1):
        snippet = " ".join(hit["text"].split())[:110]
        print(f"  {i}. {hit['score']:.3f}  {hit['chunk_id']}  [{hit['title']}]  {snippet}...")
    print(f"  ({answer['took_ms']:.0f} ms)")


def _print_image_search(body: dict[str, Any], answer: dict[str, Any], json_output: bool) -> None:
    if not _shown(f"POST /v1/images/search  {body['query']!r}", body, answer, json_output):
        return
    captions = [hit["caption"] for hit in answer["hits"]]
    right = sum(c == body["query"] for c in captions)
    for i, hit in enumerate(answer["hits"], 1):
        print(f"  {i}. {hit['score']:.3f}  {hit['image_id']}  caption {hit['caption']!r}")
    print(f"  ({right} of {len(captions)} hits are {body['query']!r}; {answer['took_ms']:.0f} ms)")


def _print_rag(body: dict[str, Any], answer: dict[str, Any], json_output: bool) -> None:
    if not _shown(f"POST /v1/rag  {body['question']!r}", body, answer, json_output):
        return
    print(f"  answer: {answer['answer']}")
    print(f"  abstained: {answer['abstained']}" + (f" ({answer['reason']})" if answer["reason"] else ""))
    for c in answer["citations"]:
        print(
            f"  cites [{c['number']}] {c['chunk_id']} span {c['span']}: {' '.join(c['text'].split())[:90]}..."
        )
    print(f"  ({answer['model']}, {answer['took_ms']:.0f} ms)")


def _graph_queries(http: httpx.Client, json_output: bool) -> bool:
    """The knowledge graph over HTTP: an entity, a path, a graph-mode search; whether all answered."""
    response = http.get(f"/v1/graph/entities/{quote(SAMPLE_ENTITY)}", params={"limit": 5})
    answer = response.json()
    if _shown(f"GET /v1/graph/entities/{SAMPLE_ENTITY}", {"name": SAMPLE_ENTITY}, answer, json_output):
        e = answer["entity"]
        print(
            f"  {e['name']} ({e['label']}): {e['mentions']} mentions, {e['degree']} neighbours; "
            f"aliases {e['aliases'][:4]}"
        )
        for n in answer["neighbours"]:
            arrow = "->" if n["direction"] == "out" else "<-"
            print(
                f"  {arrow} {n['relation']} {arrow} {n['entity']}  "
                f"(in {len(n['chunks'])} chunks: {n['chunks'][:2]})"
            )
    ok = response.status_code == 200
    response = http.post("/v1/graph/query", json=SAMPLE_PATH)
    answer = response.json()
    if _shown(
        f"POST /v1/graph/query  path {PATH_ENDS[0]!r} -> {PATH_ENDS[1]!r}", SAMPLE_PATH, answer, json_output
    ):
        for path in answer["paths"]:
            steps = [
                f"{a} ={step[0]['relation']}= " for a, step in zip(path["nodes"], path["steps"], strict=False)
            ]
            evidence = [step[0]["chunks"][0] for step in path["steps"]]
            print(f"  {''.join(steps)}{path['nodes'][-1]}   (evidence {evidence})")
        if not answer["paths"]:
            print("  no path within 3 hops")
    ok = ok and response.status_code == 200
    response = http.post("/v1/search", json=SAMPLE_GRAPH_SEARCH)
    answer = response.json()
    if _shown(
        f"POST /v1/search  {SAMPLE_GRAPH_SEARCH['query']!r}  (mode graph)",
        SAMPLE_GRAPH_SEARCH,
        answer,
        json_output,
    ):
        for i, hit in enumerate(answer["hits"], 1):
            snippet = " ".join(hit["text"].split())[:90]
            brought = hit["explanation"]["graph_entities"][:3]
            print(f"  {i}. {hit['score']:.3f}  {hit['chunk_id']}  {snippet}...  (graph: {brought})")
        print(f"  ({answer['took_ms']:.0f} ms)")
    return ok and response.status_code == 200


def _curl_lines(url: str, images: bool, graph: bool = False) -> str:
    image_lines = (
        ""
        if not images
        else f"""
  curl -s {url}/v1/images/search -H 'content-type: application/json' \\
    -d '{{"query": "a green triangle", "k": 3}}'
  curl -s {url}/v1/search -H 'content-type: application/json' \\
    -d '{{"query": "a red circle", "k": 5, "mode": "vector", "modalities": ["text", "image"]}}'"""
    )
    graph_lines = (
        ""
        if not graph
        else f"""
  curl -s '{url}/v1/graph/entities?q=tesla&limit=5'
  curl -s {url}/v1/graph/query -H 'content-type: application/json' \\
    -d '{{"entity": "Nikola Tesla", "hops": 2, "limit": 20}}'"""
    )
    return f"""
Try more (the app stays up with `riverbed demo --serve` or `riverbed serve`):
  curl -s {url}/v1/search -H 'content-type: application/json' \\
    -d '{{"query": "When was the University of Chicago founded?", "k": 3, "mode": "hybrid"}}'
  curl -s {url}/v1/rag -H 'content-type: application/json' \\
    -d '{{"question": "Who founded Tesla?"}}'{image_lines}{graph_lines}
  curl -s {url}/v1/embeddings -H 'content-type: application/json' -d '{{"input": ["hello world"]}}'
  curl -s -X POST {url}/v1/documents -H 'content-type: application/json' \\
    -d '{{"kind": "document", "id": "note-1", "text": "Riverbed indexes live streams."}}'
  curl -s {url}/v1/documents/note-1
  curl -s {url}/metrics | grep riverbed_"""


def _wait_for_signal() -> None:
    import signal

    stopping = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stopping["flag"]:
        time.sleep(0.5)
