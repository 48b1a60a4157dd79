"""Images over real HTTP: easy-vqa images and a few passages through the real broker and pipeline
into an index and its images index, served by Ray Serve with a LiT image model (Riverbed's own
when this machine has trained it, else a tiny one trained here), so text and image vectors share
the text embedder's space.

Text -> image finds the right colour and shape at rank 1 for most captions, image -> image finds
the image itself, passages and images rank together in /v1/search, RAG cites images, documents
and images are told apart, an image posted over HTTP gets indexed, and bad requests are 400s
naming the field."""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.image_datasets import CaptionedImage, load_image_dataset
from cluster.kafka_admin import ensure_topics
from schemas.envelope import IMAGE_METADATA_KEYS, DocumentEnvelope, ImageEnvelope
from schemas.settings import Settings, load_settings
from tests.integration.conftest import ImageModel, free_port
from tests.integration.ingest_helpers import produce, squad_documents

N_IMAGES = 60
N_SQUAD = 20
SHAPES = [
    DocumentEnvelope(
        id="shapes-red", title="Shapes", text="A red circle is a round shape filled with red paint."
    ),
    DocumentEnvelope(
        id="shapes-blue", title="Shapes", text="A blue triangle has three sides and three corners."
    ),
]


@dataclass(frozen=True)
class App:
    url: str
    settings: Settings
    images: dict[str, CaptionedImage]
    """By image id (``img-<n>``)."""
    model: ImageModel


def image_envelope(item: CaptionedImage) -> ImageEnvelope:
    _, color, shape = item.caption.split()
    return ImageEnvelope(
        id=f"img-{item.id}",
        image_b64=b64(item.path),
        caption=item.caption,
        metadata={"color": color, "shape": shape},
    )


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def app(broker, ray_session, tmp_path_factory, image_model: ImageModel) -> Iterator[App]:
    import ray
    from ray import serve

    from cluster.serving import start_serving

    name = f"simg{uuid.uuid4().hex[:8]}"
    topics = {"documents": f"t.{name}.docs", "images": f"t.{name}.images", "dead_letter": f"t.{name}.dlq"}
    settings = load_settings(
        overrides={
            "home": str(tmp_path_factory.mktemp("serve-images-home")),
            "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": topics},
            "index": {"name": name, "n_shards": 2},
            "images": {"ingest": True, "device": "cpu", "num_cpus": 1, **image_model.images},
            "serve": {"port": free_port()},
        }
    )
    ensure_topics(
        broker.bootstrap_servers, {topics["documents"]: 2, topics["images"]: 1, topics["dead_letter"]: 1}
    )
    items = load_image_dataset("easy-vqa", "test", limit=N_IMAGES).items
    produce(settings, [*squad_documents(N_SQUAD), *SHAPES])
    produce(settings, map(image_envelope, items), topic=topics["images"])
    serving = start_serving(settings, ingest=True)
    try:
        assert serving.pipeline is not None and serving.pipeline.images
        serving.pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        yield App(serving.url, settings, {f"img-{i.id}": i for i in items}, image_model)
    finally:
        try:
            serving.stop()
        finally:
            serve.shutdown()
            for index in (name, settings.image_side().index.name):
                for i in range(settings.index.n_shards):
                    with contextlib.suppress(ValueError):
                        ray.kill(ray.get_actor(f"{index}/shard/{i}", namespace=settings.ray.namespace))


def check_image_hit(app: App, hit: dict) -> None:
    item = app.images[hit["image_id"]]
    assert hit["caption"] == item.caption and hit["uri"] is None
    assert not set(hit["metadata"]) & set(IMAGE_METADATA_KEYS)
    assert base64.b64decode(hit["thumbnail_b64"])[:3] == b"\xff\xd8\xff", "a JPEG thumbnail"


# TEXT -> IMAGE, IMAGE -> IMAGE
def test_text_to_image_finds_the_right_colour_and_shape_at_rank_1_for_most_captions(app, http):
    captions = sorted({item.caption for item in app.images.values()})
    right = 0
    for caption in captions:
        r = http.post("/v1/images/search", json={"query": caption, "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["target"] == "image" and body["query"] == caption and len(body["hits"]) == 3
        for hit in body["hits"]:
            check_image_hit(app, hit)
        right += body["hits"][0]["caption"] == caption
    print(f"text -> image rank 1: {right}/{len(captions)}")
    assert right / len(captions) >= app.model.min_rank1


def test_image_to_image_finds_the_image_itself_first(app, http):
    for image_id in list(app.images)[:5]:
        r = http.post("/v1/images/search", json={"image_b64": b64(app.images[image_id].path), "k": 3})
        assert r.status_code == 200, r.text
        top = r.json()["hits"][0]
        assert top["image_id"] == image_id and top["score"] > 0.99
        assert r.json()["query"] is None


def test_image_search_filters_on_metadata(http):
    r = http.post("/v1/images/search", json={"query": "a shape", "k": 10, "filter": {"shape": "circle"}})
    hits = r.json()["hits"]
    assert r.status_code == 200 and hits and all(h["metadata"]["shape"] == "circle" for h in hits)


def test_an_image_query_finds_passages_with_target_text(app, http):
    image = next(i for i in app.images.values() if i.caption == "a red circle")
    r = http.post("/v1/images/search", json={"image_b64": b64(image.path), "k": 3, "target": "text"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 3 and all(h["modality"] == "text" and h["chunk_id"].startswith(h["document_id"])
                                  for h in hits)  # fmt: skip


# PASSAGES AND IMAGES TOGETHER
def test_search_ranks_passages_and_images_together_by_one_vector(app, http):
    r = http.post(
        "/v1/search",
        json={"query": "a red circle", "k": 10, "mode": "vector", "modalities": ["text", "image"]},
    )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert {h["modality"] for h in hits} == {"text", "image"}
    assert "shapes-red" in [h["document_id"] for h in hits if h["modality"] == "text"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True), "one space: merged by cosine"
    for hit in hits:
        if hit["modality"] == "image":
            assert hit["image_id"] == hit["document_id"] and hit["chunk_id"] == f"{hit['image_id']}#0"
            assert hit["text"] == app.images[hit["image_id"]].caption and hit["span"] == [0, len(hit["text"])]
            assert hit["thumbnail_b64"] and not set(hit["metadata"]) & set(IMAGE_METADATA_KEYS)
        else:
            assert hit["image_id"] is None and hit["thumbnail_b64"] is None


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_keyword_and_hybrid_search_read_captions(http, mode):
    r = http.post("/v1/search", json={"query": "circle", "k": 5, "mode": mode, "modalities": ["image"]})
    hits = r.json()["hits"]
    assert r.status_code == 200 and hits and all(h["modality"] == "image" for h in hits)
    if mode == "keyword":
        assert all("circle" in h["text"] for h in hits)


def test_search_without_modalities_is_passages_only(http):
    hits = http.post("/v1/search", json={"query": "a red circle", "k": 10}).json()["hits"]
    assert hits and {h["modality"] for h in hits} == {"text"}


def test_rag_over_images_cites_them(app, http):
    r = http.post("/v1/rag", json={"question": "What colour is the circle?", "k": 2, "modalities": ["image"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert all(p["modality"] == "image" for p in body["passages"])
    for citation in body["citations"]:
        assert citation["modality"] == "image" and citation["image_id"] in app.images


# DOCUMENTS AND IMAGES
def test_document_status_tells_documents_and_images_apart(app, http):
    image_id = next(iter(app.images))
    body = http.get(f"/v1/documents/{image_id}").json()
    assert (body["kind"], body["indexed"], body["chunks"]) == ("image", True, 1)
    assert body["source"]["topic"] == app.settings.kafka.topics.images
    body = http.get("/v1/documents/shapes-red").json()
    assert (body["kind"], body["indexed"]) == ("document", True)
    assert http.get("/v1/documents/no-such-thing").json()["kind"] is None


def test_an_image_posted_over_http_gets_indexed(app, http):
    item = next(iter(app.images.values()))
    envelope = {"kind": "image", "id": "posted-image", "image_b64": b64(item.path), "caption": "posted"}
    r = http.post("/v1/documents", json=envelope)
    assert r.status_code == 202, r.text
    assert r.json()["records"][0]["topic"] == app.settings.kafka.topics.images
    deadline = time.monotonic() + 120
    while (body := http.get("/v1/documents/posted-image").json())["kind"] != "image":
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    assert body["indexed"] is True


# BAD REQUESTS
BAD = [
    ("/v1/images/search", {}, "image_b64"),
    ("/v1/images/search", {"query": "a red circle", "image_b64": "iVBORw0KGgo="}, "image_b64"),
    ("/v1/images/search", {"image_b64": base64.b64encode(b"not an image").decode()}, "image_b64"),
    ("/v1/images/search", {"image_b64": "%%%"}, "image_b64"),
    ("/v1/images/search", {"query": "a red circle", "target": "text"}, "target"),
    ("/v1/images/search", {"query": "a red circle", "k": 0}, "k"),
    ("/v1/search", {"query": "x", "modalities": []}, "modalities"),
    ("/v1/search", {"query": "x", "modalities": ["audio"]}, "modalities.0"),
    ("/v1/search", {"query": "x", "modalities": ["text", "image"], "filter": {"nope": 1}}, "filter"),
    ("/v1/rag", {"question": "x", "modalities": ["image", "image"]}, "modalities"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[f"{p} {b}"[:60] for p, b, _ in BAD])
def test_bad_requests_are_400s_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
