"""Image queries on the serving side, without Ray: passages and images searched together (one space:
merged by score; two spaces or keyword: fused by rank) over in-process shards with vectors made by
hand, hits shaped for HTTP (the reserved uri and thumbnail keys out of metadata), the image query
model (lazy, 503 naming the training command when Riverbed's model is not trained, 400 naming
image_b64 for an unreadable image), and the ingress's routes over fake deployment handles."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from actors.index_shard import IndexShard
from actors.vector_index import ChunkRecord, Hit
from deployments.fusion import Ranked, fuse_ranks, merge_by_score
from deployments.hits import as_passage, citation, image_hit, judged_score, search_hit
from deployments.http_errors import ApiError, ModelUnavailableError, as_api_error
from deployments.image_embedder import ImageQueryModel
from deployments.ingress import Ingress
from deployments.modal_searcher import ModalSearcher
from deployments.retriever import Retriever
from deployments.searcher import LocalShards, Searcher
from schemas.api import ImageSearchRequest, RagRequest, SearchRequest
from schemas.envelope import IMAGE_THUMBNAIL_KEY, IMAGE_URI_KEY
from schemas.errors import InvalidRequestError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from schemas.settings import FaissConfig, ImagesConfig, IndexConfig, SearchConfig, load_settings

DIM = 4
THUMB = base64.b64encode(b"jpeg bytes").decode()


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


QUERY = unit(1, 0, 0, 0)  # "red": the text embedder's vector, and the LiT image model's text vector
OTHER_SPACE_QUERY = unit(0, 1, 0, 0)  # what a model with its own text space makes of the query
PASSAGES = {  # id: (text, metadata, vector); cosines with QUERY: 0.894, 0.196, 0.707
    "t-red": ("A passage about red circles.", {"lang": "en"}, unit(1, 0.5, 0, 0)),
    "t-blue": ("A passage about blue squares.", {"lang": "en"}, unit(0.2, 1, 0, 0)),
    "same": ("A document whose id an image has too.", {"lang": "fr"}, unit(1, 0, 1, 0)),
}
RED_URI = "file:///img/red.png"
IMAGES = {  # id: (caption, metadata, vector); cosines with QUERY: 0.995, 0.287, 0.0
    "i-red": ("a red circle", {"color": "red", IMAGE_URI_KEY: RED_URI, IMAGE_THUMBNAIL_KEY: THUMB},
              unit(1, 0.1, 0, 0)),
    "i-blue": ("a blue rectangle", {"color": "blue", IMAGE_THUMBNAIL_KEY: THUMB}, unit(0.3, 1, 0, 0)),
    "same": ("", {"color": "gray", IMAGE_THUMBNAIL_KEY: THUMB}, unit(0, 0, 0, 1)),
}  # fmt: skip


def _shard(directory: Path, items: dict[str, tuple[str, dict, np.ndarray]], title: bool) -> IndexShard:
    shard = IndexShard(IndexConfig(n_shards=1, faiss=FaissConfig(omp_threads=1)), directory, 0, "hand", DIM)
    shard.warm_up()
    records = [
        ChunkRecord(chunk_id(i, 0), i, 0, text, i if title else None, 0, len(text), meta, vector)
        for i, (text, meta, vector) in items.items()
    ]
    shard.index.upsert(records)
    return shard


class LocalRetriever(Retriever.func_or_class):
    """The Retriever's logic over in-process shards: its ``search`` without Serve's batching
    (text queries without a vector embedded as QUERY, as the real one embeds them, and ``embed``
    too)."""

    def __init__(self, text: LocalShards, images: LocalShards) -> None:
        config = SearchConfig(candidates=5)
        self.shards, self.image_shards = text, images
        self.searchers = {"text": Searcher(config, text), "image": Searcher(config, images, modality="image")}
        self.searcher = self.searchers["text"]
        self.modal = ModalSearcher(self.searchers)

    async def search(self, query, vector, k, filter, mode, side="text"):
        if vector is None and mode != "keyword" and side == "text":  # as the Retriever embeds
            vector = QUERY
        vectors = None if vector is None else vector.reshape(1, -1)
        return (await self.searchers[side].search_many([query], vectors, k, filter, mode))[0]

    async def embed(self, text):  # the vector sent with image-side searches
        return QUERY


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRetriever]:
    text = _shard(tmp_path_factory.mktemp("text"), PASSAGES, title=True)
    images = _shard(tmp_path_factory.mktemp("images"), IMAGES, title=False)
    yield LocalRetriever(LocalShards([text]), LocalShards([images]))
    text.close()
    images.close()


def search(retriever: LocalRetriever, mode: str, same_space: bool, k: int = 6, filter: dict | None = None,
           query: str = "red circle") -> list[Ranked]:  # fmt: skip
    vectors = {"text": QUERY, "image": QUERY if same_space else OTHER_SPACE_QUERY}
    if mode == "keyword":
        vectors = {"text": None, "image": None}
    parsed = MetadataFilter.parse(filter) if filter else None
    return asyncio.run(
        retriever.search_modalities(query, vectors, k, parsed, mode, ["text", "image"], same_space)
    )


def keys(ranked: list[Ranked]) -> list[tuple[str, str]]:
    return [(r.modality, r.hit.document_id) for r in ranked]


# MERGING MODALITIES
def test_one_space_vector_hits_merge_by_score_across_indexes(retriever):
    ranked = search(retriever, "vector", same_space=True)
    assert keys(ranked)[:4] == [("image", "i-red"), ("text", "t-red"), ("text", "same"), ("image", "i-blue")]
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(IMAGES["i-red"][2] @ QUERY))


def test_two_spaces_fuse_by_rank_and_search_images_with_the_image_models_own_vector(retriever):
    ranked = search(retriever, "vector", same_space=False)
    # text ranks t-red, same, t-blue; images (by OTHER_SPACE_QUERY) i-blue, i-red, same: interleaved
    assert keys(ranked) == [("text", "t-red"), ("image", "i-blue"), ("text", "same"), ("image", "i-red"),
                            ("text", "t-blue"), ("image", "same")]  # fmt: skip
    assert [r.score for r in ranked] == [r.fused_score for r in ranked]


def test_keyword_search_reads_captions_and_fuses_by_rank(retriever):
    ranked = search(retriever, "keyword", same_space=True, query="red circle")
    assert set(keys(ranked)) == {("text", "t-red"), ("image", "i-red")}
    assert all(r.keyword_rank == 1 for r in ranked)


def test_hybrid_in_one_space_ranks_vectors_over_both_indexes(retriever):
    ranked = search(retriever, "hybrid", same_space=True, query="red circle")
    assert keys(ranked)[:2] == [("image", "i-red"), ("text", "t-red")]
    assert [r.vector_rank for r in ranked[:2]] == [1, 2]  # ranks over the merged vector list
    assert ranked[0].fused_score == pytest.approx(1 / (20 + 1) + 2 / (20 + 1))  # rrf_k 20, weights 1:2


def test_an_image_and_a_document_with_one_id_are_two_hits(retriever):
    found = keys(search(retriever, "vector", same_space=True))
    assert ("text", "same") in found and ("image", "same") in found


def test_a_filter_field_of_one_index_is_accepted_and_matches_there_only(retriever):
    ranked = search(retriever, "vector", same_space=True, filter={"color": "red"})
    assert keys(ranked) == [("image", "i-red")]


def test_a_filter_field_of_neither_index_is_a_400_listing_both_indexes_fields(retriever):
    with pytest.raises(InvalidRequestError, match=r"'colour'.*color.*lang") as caught:
        search(retriever, "vector", same_space=True, filter={"colour": "red"})
    assert caught.value.param == "filter"


@pytest.mark.parametrize("modalities", [["image"], ["text", "image"]])
def test_the_reserved_image_keys_are_not_filter_fields(retriever, modalities):
    parsed = MetadataFilter.parse({IMAGE_URI_KEY: RED_URI})
    with pytest.raises(InvalidRequestError, match=f"unknown filter field '{IMAGE_URI_KEY}'") as caught:
        asyncio.run(retriever.search_modalities("q", {"text": QUERY, "image": QUERY}, 2, parsed, "vector",
                                                modalities, True))  # fmt: skip
    listed = str(caught.value).split("the index has: ")[1]
    assert "color" in listed and IMAGE_URI_KEY not in listed and IMAGE_THUMBNAIL_KEY not in listed


def test_one_modality_is_that_indexes_search_tagged_with_it(retriever):
    ranked = asyncio.run(
        retriever.search_modalities("q", {"image": QUERY}, 2, None, "vector", ["image"], True)
    )
    assert keys(ranked) == [("image", "i-red"), ("image", "i-blue")]


def test_batched_queries_go_to_the_side_each_names_and_errors_stay_with_their_group(retriever):
    """The Retriever's search stage, one batch: mixing text and image queries answers each from its
    own index; a bad filter fails only the queries that sent it."""
    batched = Retriever.func_or_class._search_batch
    bad = MetadataFilter.parse({"nope": "x"})
    requests = [
        ("red", QUERY, 2, None, "vector", "image"),
        ("red", QUERY, 2, None, "vector", "text"),
        ("red", QUERY, 1, None, "vector", "image"),
        ("red", QUERY, 2, bad, "vector", "text"),
    ]
    image2, text2, image1, failed = asyncio.run(batched(retriever, requests))
    assert keys(image2) == [("image", "i-red"), ("image", "i-blue")] and keys(image1) == [("image", "i-red")]
    assert keys(text2) == [("text", "t-red"), ("text", "same")]
    assert isinstance(failed, InvalidRequestError) and "nope" in str(failed)


class CountingEmbedder:
    """Embeds every text as QUERY and records each forward pass; ``fail`` makes them raise."""

    def __init__(self, fail: bool = False) -> None:
        self.passes: list[list[str]] = []
        self.fail = fail

    def embed(self, texts: list[str]) -> np.ndarray:
        self.passes.append(list(texts))
        if self.fail:
            raise RuntimeError("the model is gone")
        return np.stack([QUERY for _ in texts])


class BatchedRetriever(LocalRetriever):
    """LocalRetriever with the Retriever's own ``search`` and ``embed``: both batching stages."""

    search = Retriever.func_or_class.search
    embed = Retriever.func_or_class.embed

    def __init__(self, local: LocalRetriever, embedder: CountingEmbedder) -> None:
        self.__dict__.update(local.__dict__)
        self.embedder = embedder
        self._batchers(SearchConfig())


def test_concurrent_text_queries_without_a_vector_share_one_forward_pass(retriever):
    embedder = CountingEmbedder()
    batched = BatchedRetriever(retriever, embedder)
    given = asyncio.run(batched.search("red", QUERY, 2, None, "vector", "text"))
    assert embedder.passes == []  # it brought its vector

    async def together() -> list:
        return await asyncio.gather(
            batched.search("red", None, 2, None, "vector", "text"),
            batched.search("blue", None, 2, None, "hybrid", "text"),
            batched.search("red", None, 2, None, "keyword", "text"),  # needs no vector
            batched.search("red", QUERY, 2, None, "vector", "image"),  # brought its own
            batched.embed("green"),  # what an image-side search is sent with
        )

    vector, hybrid, keyword, image, green = asyncio.run(together())
    assert embedder.passes == [["red", "blue", "green"]]
    assert keys(vector) == keys(given) and hybrid and keyword
    assert keys(image) == [("image", "i-red"), ("image", "i-blue")]
    assert np.array_equal(green, QUERY)
    # searches: the given one; then the two that need no embedding, while the pass runs; then the two
    # it embedded, which it answers together
    assert (batched._searching.batches, batched._searching.items) == (3, 5)


def test_a_failed_forward_pass_fails_its_queries_and_not_the_keyword_ones(retriever):
    batched = BatchedRetriever(retriever, CountingEmbedder(fail=True))

    async def together() -> list:
        return await asyncio.gather(
            batched.search("red", None, 2, None, "vector", "text"),
            batched.search("red", None, 2, None, "keyword", "text"),
            return_exceptions=True,
        )

    failed, keyword = asyncio.run(together())
    assert isinstance(failed, RuntimeError) and "the model is gone" in str(failed)
    assert keys(keyword) == keys(asyncio.run(batched.search("red", None, 2, None, "keyword", "text")))


def test_merge_helpers_break_ties_by_list_order():
    hit = Hit("a#0", "a", 0, "", None, 0, 0, {}, 0.5)
    text, image = Ranked(hit, 0.5), Ranked(hit, 0.5, modality="image")
    assert merge_by_score([[text], [image]], 2) == [text, image]
    assert [r.modality for r in fuse_ranks([[image], [text]], 2)] == ["image", "text"]


# HIT SHAPES
def test_image_hits_carry_uri_and_thumbnail_and_never_the_reserved_keys(retriever):
    ranked = search(retriever, "vector", same_space=True)
    by_id = {r.hit.document_id: r for r in ranked if r.modality == "image"}
    red = image_hit(by_id["i-red"])
    assert (red.image_id, red.caption, red.uri, red.thumbnail_b64) == (
        "i-red",
        "a red circle",
        RED_URI,
        THUMB,
    )
    assert red.metadata == {"color": "red"}
    blank = image_hit(by_id["same"])
    assert blank.caption is None and blank.uri is None and blank.metadata == {"color": "gray"}
    hit = search_hit(by_id["i-red"], explain_query="red")
    assert (hit.modality, hit.image_id, hit.uri, hit.thumbnail_b64) == ("image", "i-red", RED_URI,
                                                                        THUMB)  # fmt: skip
    assert hit.metadata == {"color": "red"} and hit.text == "a red circle" and hit.chunk_id == "i-red#0"
    assert [t["term"] for t in hit.explanation.matched_terms] == ["red"]


def test_passage_hits_say_text_and_keep_their_metadata_whole(retriever):
    passage = next(r for r in search(retriever, "vector", same_space=True) if r.modality == "text")
    hit = search_hit(passage)
    assert hit.modality == "text" and hit.image_id is None and hit.uri is None and hit.thumbnail_b64 is None
    assert hit.metadata == {"lang": "en"} and hit.explanation is None


def test_an_image_is_a_passage_of_its_caption_and_metadata(retriever):
    by_id = {r.hit.document_id: r for r in search(retriever, "vector", True) if r.modality == "image"}
    red = as_passage(by_id["i-red"])
    assert red.title == "image i-red" and red.text == "a red circle (color: red)"
    assert (red.start, red.end) == (0, len("a red circle"))
    assert as_passage(by_id["same"]).text == "(no caption) (color: gray)"
    assert red.metadata == {"color": "red"}, "the generator never gets the thumbnail"
    fields = {"number": 1, "chunk_id": "i-red#0", "document_id": "i-red", "span": (0, 12), "text": red.text}
    cited = citation(fields, by_id["i-red"])
    assert (cited.modality, cited.image_id, cited.uri) == ("image", "i-red", RED_URI)
    assert cited.text == "a red circle" and cited.span == (0, 12), "the text is what the span covers"
    narrowed = citation({**fields, "span": (2, 5)}, by_id["i-red"])
    assert narrowed.text == "red"


def test_weak_retrieval_is_judged_on_passages_vector_scores_only(retriever):
    ranked = search(retriever, "vector", same_space=True)
    assert [judged_score(r) for r in ranked] == [r.vector_score if r.modality == "text" else None
                                                 for r in ranked]  # fmt: skip
    assert {r.modality for r in ranked} == {"text", "image"} and ranked[0].vector_score is not None


# THE IMAGE QUERY MODEL
def png_b64(color: str = "red", size: int = 16) -> str:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


class FakeModel:
    def __init__(self, text_space: str | None = "sentence-transformers/all-MiniLM-L6-v2") -> None:
        self.text_space, self.dim, self.seen = text_space, DIM, []

    def warm_up(self) -> None: ...

    def embed_images(self, images):
        self.seen.extend(images)
        return np.stack([QUERY for _ in images])

    def embed_texts(self, texts):
        return np.stack([OTHER_SPACE_QUERY for _ in texts])


def test_riverbeds_model_not_trained_yet_is_a_503_naming_the_training_command(tmp_path):
    made: list[int] = []
    clock = [0.0]

    def make():
        from actors.image_model import ImageTextModel

        made.append(1)
        return ImageTextModel(ImagesConfig(), text_model="sentence-transformers/all-MiniLM-L6-v2",
                              cache_dir=tmp_path)  # fmt: skip

    queries = ImageQueryModel(ImagesConfig(), "sentence-transformers/all-MiniLM-L6-v2", tmp_path,
                              make_model=make, reload_after_s=10, clock=lambda: clock[0])  # fmt: skip
    with pytest.raises(ModelUnavailableError) as caught:
        queries.describe()
    message = str(caught.value)
    assert "riverbed finetune image-text --dataset easy-vqa" in message and "text search" in message
    error = as_api_error(caught.value)
    assert error is not None and (error.status, error.code) == (503, "model_unavailable")
    with pytest.raises(ModelUnavailableError):
        queries.embed_texts(["a red circle"])
    assert len(made) == 1, "a failed load is not tried again on every request"
    clock[0] = 11.0
    with pytest.raises(ModelUnavailableError):
        queries.describe()
    assert len(made) == 2, "it is tried again once reload_after_s has passed"


@pytest.mark.parametrize(
    ("image_b64", "needle"),
    [("not base64!", "not valid base64"), (base64.b64encode(b"plain text").decode(), "not a PNG"),
     (png_b64()[:41], "not valid base64"), (png_b64()[:40], "cannot decode|not a PNG")],
)  # fmt: skip
def test_an_unreadable_query_image_is_a_400_naming_image_b64(tmp_path, image_b64, needle):
    model = FakeModel()
    queries = ImageQueryModel(ImagesConfig(), "m", tmp_path, make_model=lambda: model)
    with pytest.raises(InvalidRequestError, match=needle) as caught:
        queries.embed_image_b64(image_b64)
    assert caught.value.param == "image_b64" and str(caught.value).startswith("image_b64: ")
    assert as_api_error(caught.value).status == 400
    assert model.seen == []


def test_a_query_image_over_the_pixel_limit_is_a_400(tmp_path):
    queries = ImageQueryModel(ImagesConfig(max_pixels=100), "m", tmp_path, make_model=FakeModel)
    with pytest.raises(InvalidRequestError, match="pixels") as caught:
        queries.embed_image_b64(png_b64(size=16))
    assert caught.value.param == "image_b64"


def test_a_readable_query_image_is_embedded_as_rgb(tmp_path):
    model = FakeModel()
    queries = ImageQueryModel(ImagesConfig(), "m", tmp_path, make_model=lambda: model)
    np.testing.assert_allclose(queries.embed_image_b64(png_b64("blue")), QUERY)
    assert model.seen[0].mode == "RGB" and model.seen[0].getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("text_space", "same"), [("idx-model", True), ("other", False), (None, False)])
def test_describe_says_whether_the_model_shares_the_indexs_text_space(tmp_path, text_space, same):
    queries = ImageQueryModel(ImagesConfig(model="m"), "idx-model", tmp_path,
                              make_model=lambda: FakeModel(text_space))  # fmt: skip
    assert queries.describe() == {"model": "m", "dim": DIM, "text_space": text_space, "same_space": same}


def test_a_clip_style_model_loads_and_has_its_own_text_space(tmp_path):
    from actors.models import resolve_model
    from actors.testing.tiny_clip import save_tiny_clip

    directory = save_tiny_clip(
        tmp_path / "clip", resolve_model("sentence-transformers/all-MiniLM-L6-v2").location
    )
    queries = ImageQueryModel(ImagesConfig(model=str(directory), device="cpu", num_cpus=1),
                              "sentence-transformers/all-MiniLM-L6-v2", tmp_path)  # fmt: skip
    assert queries.describe()["same_space"] is False
    vector = queries.embed_image_b64(png_b64())
    assert vector.shape == (24,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


# THE INGRESS, over fake deployment handles
class _Method:
    def __init__(self, target: object, name: str, calls: list[str]) -> None:
        self.target, self.name, self.calls = target, name, calls

    def remote(self, *args: Any) -> Any:
        self.calls.append(self.name)

        async def call() -> Any:
            result = getattr(self.target, self.name)(*args)
            return await result if asyncio.iscoroutine(result) else result

        return call()


class FakeHandle:
    """A deployment handle over a plain object: ``handle.method.remote(...)`` awaits its method."""

    def __init__(self, target: object) -> None:
        self.target, self.calls = target, []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self.target, name, self.calls)

    def options(self, **_: Any) -> FakeHandle:
        return self


class FakeImageEmbedder:
    def __init__(self, same_space: bool, problem: str | None = None) -> None:
        self.same_space, self.problem = same_space, problem

    def describe(self) -> dict[str, Any]:
        if self.problem is not None:
            raise ModelUnavailableError(self.problem)
        space = "sentence-transformers/all-MiniLM-L6-v2" if self.same_space else None
        return {"model": "m", "dim": DIM, "text_space": space, "same_space": self.same_space}

    def embed_text(self, text: str) -> np.ndarray:
        self.describe()
        return QUERY if self.same_space else OTHER_SPACE_QUERY

    def embed_image(self, image_b64: str) -> np.ndarray:
        self.describe()
        return unit(1, 0.1, 0, 0)  # as i-red itself


class FakeGenerator:
    """Cites the passages numbered ``cite`` (1-based, in prompt order) and remembers what it got."""

    def __init__(self, cite: tuple[int, ...] = (1,)) -> None:
        self.cite, self.hits, self.scores = cite, [], []

    def answer(self, question: str, hits: list[Hit], scores: list[float | None], k: int) -> dict[str, Any]:
        self.hits, self.scores = hits, scores
        citations = [{"number": n, "chunk_id": hits[n - 1].chunk_id, "document_id": hits[n - 1].document_id,
                      "span": hits[n - 1].span, "text": hits[n - 1].text} for n in self.cite]  # fmt: skip
        return {"answer": "red", "abstained": False, "reason": None, "citations": citations,
                "passages": hits[:k], "model": "fake"}  # fmt: skip


IngressClass: Any = Ingress.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper


def make_ingress(
    retriever: LocalRetriever, image_embedder: FakeImageEmbedder, generator: FakeGenerator | None = None
) -> Any:
    parts = (object(), retriever, generator or FakeGenerator(), image_embedder)
    handles = [FakeHandle(x) for x in parts]
    return IngressClass(load_settings(), "127.0.0.1:9", *handles)


def call(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_search_over_both_modalities_marks_each_hit(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(same_space=True))
    body = call(ingress.search(SearchRequest(query="red", k=3, mode="vector", modalities=["text", "image"])))
    assert [(h.modality, h.document_id) for h in body.hits] == [("image", "i-red"), ("text", "t-red"),
                                                                ("text", "same")]  # fmt: skip
    assert body.hits[0].thumbnail_b64 == THUMB and IMAGE_THUMBNAIL_KEY not in body.hits[0].metadata
    assert ingress.image_embedder.calls == ["describe"], "one space: the text query vector searches both"


def test_two_spaces_ask_the_image_model_for_the_image_sides_vector(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(same_space=False))
    body = call(ingress.search(SearchRequest(query="red", k=2, mode="vector", modalities=["text", "image"])))
    assert [(h.modality, h.document_id) for h in body.hits] == [("text", "t-red"), ("image", "i-blue")]
    assert ingress.image_embedder.calls == ["describe", "embed_text"]


def test_text_search_never_needs_the_image_model_and_keyword_over_images_neither(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(True, problem="not trained: run riverbed finetune"))
    body = call(ingress.search(SearchRequest(query="red circles", k=2)))
    assert body.hits and all(h.modality == "text" for h in body.hits)
    keyword = SearchRequest(query="red circle", k=4, mode="keyword", modalities=["image", "text"])
    assert {h.modality for h in call(ingress.search(keyword)).hits} == {"image", "text"}
    assert ingress.image_embedder.calls == []


@pytest.mark.parametrize(
    "request_",
    [SearchRequest(query="red", modalities=["image"]), ImageSearchRequest(query="a red circle"),
     RagRequest(question="which colour?", modalities=["text", "image"])],
)  # fmt: skip
def test_image_routes_answer_503_naming_the_training_command_while_the_model_is_missing(retriever, request_):
    ingress = make_ingress(retriever, FakeImageEmbedder(True, problem="run `riverbed finetune image-text`"))
    handler = {
        SearchRequest: ingress.search,
        ImageSearchRequest: ingress.search_images,
        RagRequest: ingress.rag,
    }
    with pytest.raises(ApiError) as caught:
        call(handler[type(request_)](request_))
    assert (caught.value.status, caught.value.code) == (503, "model_unavailable")
    assert "riverbed finetune image-text" in caught.value.message


def test_text_to_image_and_image_to_image(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(same_space=True))
    body = call(ingress.search_images(ImageSearchRequest(query="a red circle", k=2)))
    assert body.target == "image" and [h.image_id for h in body.hits] == ["i-red", "i-blue"]
    assert body.hits[0].uri == RED_URI and body.hits[0].metadata == {"color": "red"}
    body = call(ingress.search_images(ImageSearchRequest(image_b64=png_b64(), k=1, filter={"color": "blue"})))
    assert body.query is None and [h.image_id for h in body.hits] == ["i-blue"]


def test_an_image_query_finds_passages_in_one_space_and_is_a_400_in_two(retriever):
    same = make_ingress(retriever, FakeImageEmbedder(same_space=True))
    body = call(same.search_images(ImageSearchRequest(image_b64=png_b64(), k=1, target="text")))
    assert body.target == "text" and [(h.modality, h.document_id) for h in body.hits] == [("text", "t-red")]
    other = make_ingress(retriever, FakeImageEmbedder(same_space=False))
    with pytest.raises(ApiError) as caught:
        call(other.search_images(ImageSearchRequest(image_b64=png_b64(), target="text")))
    assert (caught.value.status, caught.value.param) == (400, "target")
    assert "all-MiniLM-L6-v2" in caught.value.message


def test_rag_over_images_gives_the_generator_captions_and_cites_the_image(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(same_space=True))
    body = call(ingress.rag(RagRequest(question="red", k=2, mode="vector", modalities=["text", "image"])))
    generator: FakeGenerator = ingress.generator.target
    assert generator.hits[0].text == "a red circle (color: red)" and generator.hits[0].title == "image i-red"
    [cited] = body.citations
    assert (cited.modality, cited.image_id, cited.uri) == ("image", "i-red", RED_URI)
    assert [(p.modality, p.document_id) for p in body.passages] == [("image", "i-red"), ("text", "t-red")]
    assert body.passages[0].text == "a red circle", "passages are shown as hits, not as prompt text"


def test_rag_citations_of_later_passages_name_those_passages_and_images_never_judge_weakness(retriever):
    generator = FakeGenerator(cite=(2, 1))
    ingress = make_ingress(retriever, FakeImageEmbedder(same_space=True), generator)
    body = call(ingress.rag(RagRequest(question="red", k=3, mode="vector", modalities=["text", "image"])))
    # ranked: i-red (image), t-red (text), same (text): passage 2 is t-red, passage 1 the image
    cited = [(c.number, c.modality, c.document_id) for c in body.citations]
    assert cited == [(2, "text", "t-red"), (1, "image", "i-red")]
    assert body.citations[0].image_id is None and body.citations[1].image_id == "i-red"
    assert body.citations[1].text == "a red circle", "an image's citation is its caption"
    assert generator.scores[0] is None and generator.scores[1] == pytest.approx(0.894, abs=1e-3)


def test_rag_over_passages_alone_is_as_before(retriever):
    ingress = make_ingress(retriever, FakeImageEmbedder(True, problem="missing"))
    body = call(ingress.rag(RagRequest(question="red circles", k=1, mode="vector")))
    [cited] = body.citations
    assert (cited.modality, cited.image_id, cited.document_id) == ("text", None, "t-red")


@pytest.mark.parametrize(
    ("document_id", "kind", "chunks"),
    [("t-red", "document", 1), ("i-red", "image", 1), ("same", "document", 1), ("nope", None, 0)],
)
def test_document_status_finds_images_too_and_says_which(retriever, document_id, kind, chunks):
    info = call(retriever.document(document_id))
    assert (info["kind"], info["chunks"]) == (kind, chunks)


def test_document_status_of_a_text_index_when_no_images_index_exists(retriever):
    class Missing(LocalShards):
        async def documents(self, document_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
            from schemas.errors import IndexUnavailableError

            raise IndexUnavailableError("index 'x-images' is not ready")

    lonely = LocalRetriever(retriever.shards, Missing([]))
    assert call(lonely.document("nope"))["kind"] is None
    assert call(lonely.document("t-red"))["kind"] == "document"


def test_document_status_while_the_text_index_is_down_is_its_error_even_for_an_image_id(retriever):
    from schemas.errors import IndexUnavailableError

    class Down(LocalShards):
        async def documents(self, document_ids: list[str]) -> list[dict[str, dict[str, Any]]]:
            raise IndexUnavailableError("index 'x' is not ready")

    blind = LocalRetriever(Down([]), retriever.image_shards)
    for document_id in ("i-red", "nope"):
        with pytest.raises(IndexUnavailableError, match="index 'x'"):
            call(blind.document(document_id))
