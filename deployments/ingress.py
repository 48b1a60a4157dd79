"""The HTTP ingress (FastAPI through ``serve.ingress``): the app's whole HTTP surface.

It validates requests, calls the Retriever (which embeds search and RAG queries and searches),
BulkEmbedder (``/v1/embeddings``), ImageEmbedder (image queries, and text queries against images)
and Generator deployments, and answers in the shapes of ``schemas/api.py``. Documents and images
posted here are produced onto their topics (the stream stays the source of truth): they become
searchable once the pipeline has written them. OpenAPI docs are at ``/docs``.

Passages and images: the images of the index live in its images index. ``/v1/images/search``
searches it by a text or an image (or, ``target: "text"``, the passages by an image), and
``/v1/search`` and ``/v1/rag`` search it too when ``modalities`` names ``image``. Which query
vector searches which index: when the image model shares the text embedder's space (Riverbed's
LiT model), the text query's ONE vector (the retriever's text model) searches both (vector mode: the
hits rank together by score; hybrid: fused with vector ranks over both); otherwise the images are
searched with the image model's own text vector and the two lists are fused by rank (see
:mod:`deployments.modal_searcher`). A route that needs the
image model answers 503 ``model_unavailable`` while it cannot be loaded (not trained yet); the
text routes never depend on it.

Errors keep one shape, ``{"error": {"code", "message", "param"}}``: bad input is a 4xx naming the
field, an index or shard that cannot answer is a 503 naming it, and only a bug is a 500.
``/healthz`` and ``/metrics`` cost O(1) calls per shard and source (never a scan of documents),
and answer whatever state the shards and sources are in.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at run
# time to tell the JSON body (a pydantic model) from query parameters.
import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import ray
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.routing import Match

from deployments.edge import EdgeGuard, configure, require, require_metrics
from deployments.fusion import Ranked
from deployments.generator import ABSTAIN_POOL
from deployments.hits import as_passage, citation, image_hit, judged_score, search_hit
from deployments.http_errors import (
    ApiError,
    BodyLimit,
    as_api_error,
    install_error_handlers,
    set_max_body_bytes,
)
from deployments.in_process import InIngressRetriever
from deployments.metrics import CONTENT_TYPE, health_report, http_metrics
from deployments.openapi import (
    BODY_ERRORS,
    GRAPH_BODY_ERRORS,
    GRAPH_GET_ERRORS,
    HEALTH_RESPONSES,
    METRICS_RESPONSES,
    PATH_ERRORS,
    documents_body,
    serve_openapi,
)
from schemas.api import (
    DocumentsResponse,
    DocumentStatus,
    EmbeddingsRequest,
    EmbeddingsResponse,
    GraphEntitiesResponse,
    GraphEntityResponse,
    GraphQueryRequest,
    GraphQueryResponse,
    ImageHit,
    ImageSearchRequest,
    ImageSearchResponse,
    Modality,
    ModelCard,
    ModelList,
    ProducedRecord,
    RagRequest,
    RagResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from schemas.envelope import (
    DocumentEnvelope,
    ImageEnvelope,
    InvalidEnvelopeError,
    encode_envelope,
    validate_envelope,
)
from schemas.filters import MetadataFilter
from schemas.metadata import loads_json
from schemas.settings import Settings, check_exposure
from schemas.topology import actor_name

log = logging.getLogger(__name__)

MAX_DOCUMENTS_PER_REQUEST = 1000
HEALTH_TIMEOUT_S = 10.0
"""``/healthz`` and ``/metrics`` wait this long for the shards' figures."""
SOURCE_STATS_TIMEOUT_S = 5.0
"""A running source whose ``stats()`` takes longer is reported as a problem by ``/healthz``."""
BROKER_WAIT_S = 5.0
"""How long producing documents waits for the broker, at each step: to connect (a new producer),
for a topic's metadata or buffer space (``max_block_ms``), and for the acknowledgements. Past it
the request answers 503 ``broker_unavailable``; its records may still land later, and posting the
same envelopes again is safe (an upsert replaces its id's document, a delete of a gone id is none)."""
READ = [Depends(require("read"))]
WRITE = [Depends(require("write"))]

app = FastAPI(
    title="Riverbed",
    summary="Search, RAG and embeddings over a live Kafka stream",
    version="0.1.0",
    description='Errors always answer `{"error": {"code", "message", "param"}}`.',
)
install_error_handlers(app)
serve_openapi(app)  # as the app answers: no 422, no 401/403 without keys (deployments/openapi.py)
app.add_middleware(BodyLimit)  # its limit: serve.max_body_bytes, set by the replica
app.add_middleware(EdgeGuard)  # Host and Content-Type, before the body is read; keys: READ, WRITE


@app.middleware("http")
async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    response = await call_next(request)
    elapsed = time.perf_counter() - start
    http_metrics().observe(_route(request), request.method, response.status_code, elapsed)
    return response


def _route(request: Request) -> str:
    """The route's template (``/v1/documents/{document_id}``), so ids never become labels."""
    matched = request.scope.get("route")  # set by the router on the way in
    if matched is not None and getattr(matched, "path", None):
        return str(matched.path)
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", request.url.path))
    return "unmatched"


# Helpers come before the class: Serve ships the class by value, with the globals its methods
# name as they are when the class is defined.
async def _awaited(call: Awaitable[Any] | None) -> Any:
    return None if call is None else await call


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


_Record = tuple[DocumentEnvelope | ImageEnvelope, str, bytes, bytes]
"""An envelope as produced: (envelope, topic, key, value)."""


def _check_path_utf8(request: Request, param: str) -> None:
    """400 naming ``param`` when the request's path is not UTF-8 once percent-decoded
    (``%ED%A0%80`` is a lone surrogate's bytes): the server decodes such bytes to U+FFFD, so the
    handler would act on an id the client never sent."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return  # a server that does not pass the raw path: nothing more to check
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"{param} is not UTF-8 once percent-decoded ({exc.reason} at byte {exc.start})"
        raise ApiError(400, "invalid_request", message, param) from exc


class _AnyPath(PathConvertor):
    """``:path`` with line breaks: Starlette's ``.*`` stops at one, so an id holding one was a 404
    (or, at its end, silently dropped it) instead of the handler's 400 naming ``document_id``."""

    regex = r"[\s\S]*"


register_url_convertor("anypath", _AnyPath())  # before the routes below compile their paths


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        settings: Settings,
        servers: str,
        bulk_embedder: Any,
        retriever: Any,
        generator: Any,
        image_embedder: Any,
    ) -> None:
        self.settings = settings
        self.servers = servers
        # By reference (an actor call): a response of thousands of vectors is past the 4 MiB
        # that Serve's gRPC channel between replicas accepts.
        self.bulk_embedder = bulk_embedder.options(_by_reference=True)
        # serve.search_in_ingress: this replica embeds and searches in its own process.
        self.retriever = retriever.build() if isinstance(retriever, InIngressRetriever) else retriever
        self.generator = generator
        self.image_embedder = image_embedder
        self.search_config = settings.serve.search
        self.rag_config = settings.serve.rag
        check_exposure(settings.serve)  # an open app on a public address is refused here too
        configure(settings.serve)
        set_max_body_bytes(settings.serve.max_body_bytes)
        self._producer: asyncio.Future[Any] | None = None  # its build: see _producer_build
        self._model: dict[str, Any] | None = None
        self._image_model_info: dict[str, Any] | None = None
        self._started = int(time.time())

    async def embed_query(self, text: str) -> Any:
        """The vector a text search embeds ``text`` with (``(dim,)`` float32): for a handle (the
        retriever may live in this replica, out of a handle's reach)."""
        return await self._call(self.retriever.embed.remote(text))

    # SEARCH
    @app.post("/v1/search", response_model=SearchResponse, responses=BODY_ERRORS, dependencies=READ)
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Vector, keyword (BM25) or hybrid (reciprocal rank fusion) search over the index's
        passages, its images (`modalities`), or both ranked together; each hit says its `modality`."""
        start = time.perf_counter()
        k = self._check_k(request.k, self.search_config.default_k)
        self._check_text(request.query, "query")
        ranked = await self._retrieve(request.query, k, request.filter, request.mode, request.modalities)
        return SearchResponse(
            query=request.query,
            mode=request.mode,
            k=k,
            hits=[search_hit(r, request.query if request.explain else None) for r in ranked],
            took_ms=_ms(start),
        )

    @app.post(
        "/v1/images/search", response_model=ImageSearchResponse, responses=BODY_ERRORS, dependencies=READ
    )
    async def search_images(self, request: ImageSearchRequest) -> ImageSearchResponse:
        """Images like a text (`query`) or like an image (`image_b64`), by the image model's vectors;
        with `target: "text"`, the passages like an image (when the image model shares the text
        index's space). 503 `model_unavailable` while the image model cannot be loaded."""
        start = time.perf_counter()
        k = self._check_k(request.k, self.search_config.default_k)
        if request.query is not None:
            self._check_text(request.query, "query")
        if request.image_b64 is not None:  # an unreadable image is a 400 whether or not the model loads
            vector = await self._call(self.image_embedder.embed_image.remote(request.image_b64))
        model = await self._image_model()
        if request.target == "text" and not model["same_space"]:
            space = model["text_space"] or "a text tower of its own"
            message = (
                "target 'text' needs an image model in the text index's space "
                f"({self.settings.embed.model}); images.model {model['model']!r} embeds text with {space}"
            )
            raise ApiError(400, "invalid_request", message, "target")
        if request.query is not None:
            vector = await self._call(self.image_embedder.embed_text.remote(request.query))
        ranked: list[Ranked] = await self._call(
            self.retriever.search.remote(
                request.query or "", vector, k, request.filter, "vector", request.target
            )
        )
        hits: list[ImageHit | SearchHit] = (
            [image_hit(r) for r in ranked] if request.target == "image" else [search_hit(r) for r in ranked]
        )
        return ImageSearchResponse(
            query=request.query, target=request.target, k=k, hits=hits, took_ms=_ms(start)
        )

    # RAG
    @app.post("/v1/rag", response_model=RagResponse, responses=BODY_ERRORS, dependencies=READ)
    async def rag(self, request: RagRequest) -> RagResponse:
        """Answers from the index's passages (and images, as their captions and metadata, when
        `modalities` names them), citing them; abstains when they do not hold the answer."""
        start = time.perf_counter()
        k = self._check_k(request.k, self.rag_config.k)
        self._check_text(request.question, "question")
        mode = request.mode or self.rag_config.mode
        pool = max(k, ABSTAIN_POOL)
        ranked = await self._retrieve(request.question, pool, request.filter, mode, request.modalities)
        result = await self._call(
            self.generator.answer.remote(
                request.question, [as_passage(r) for r in ranked], [judged_score(r) for r in ranked], k
            )
        )
        # The prompt numbers the first passages of `ranked`, in order: passage n is ranked[n - 1].
        explain = request.question if request.explain else None
        return RagResponse(
            question=request.question,
            answer=result["answer"],
            abstained=result["abstained"],
            reason=result["reason"],
            citations=[citation(c, ranked[c["number"] - 1]) for c in result["citations"]],
            passages=[search_hit(r, explain) for r in ranked[: len(result["passages"])]],
            model=result["model"],
            took_ms=_ms(start),
        )

    # EMBEDDINGS (OpenAI-compatible)
    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=BODY_ERRORS, dependencies=READ)
    async def embeddings(self, request: EmbeddingsRequest) -> Response:
        """OpenAI's embeddings API: `input` is a string or a list of strings, at most
        `serve.embeddings.max_inputs` of them and `serve.embeddings.max_request_tokens` tokens in
        all. Served apart from search queries: its own replicas and queue, at a lower CPU priority."""
        texts = [request.input] if isinstance(request.input, str) else list(request.input)
        if not texts:
            raise ApiError(400, "invalid_request", "input must not be an empty list", "input")
        limit = self.settings.serve.embeddings.max_inputs
        if len(texts) > limit:
            message = (
                f"input has {len(texts)} items; at most {limit} per request (serve.embeddings.max_inputs)"
            )
            raise ApiError(400, "invalid_request", message, "input")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(400, "invalid_request", f"input[{i}] is empty", "input")
        model = await self._describe()
        if request.model is not None and request.model not in (
            model["model"],
            model["model"].rsplit("/", 1)[-1],
        ):
            raise ApiError(
                400,
                "model_not_found",
                f"model {request.model!r} is not served here; this server embeds with {model['model']!r}",
                "model",
            )
        if request.dimensions is not None and request.dimensions != model["dim"]:
            raise ApiError(
                400,
                "invalid_request",
                f"dimensions must be {model['dim']} for {model['model']!r}",
                "dimensions",
            )
        # The replica answers with the EmbeddingsResponse's JSON: nothing to serialise here.
        body = await self._call(self.bulk_embedder.embed.remote(texts, request.encoding_format))
        return Response(body, media_type="application/json")

    @app.get("/v1/models", response_model=ModelList, responses=PATH_ERRORS, dependencies=READ)
    async def models(self) -> ModelList:
        """OpenAI's model list: the embedding model `/v1/embeddings` and the searches use, and the
        generator `/v1/rag` answers with."""
        return ModelList(data=await self._model_cards())

    async def _model_cards(self) -> list[ModelCard]:
        embedding = await self._describe()
        llm = self.settings.serve.llm
        owner = "riverbed" if llm.backend != "openai" else (llm.base_url or "openai")
        answers = llm.reader_model if llm.backend == "extractive" else llm.model
        return [
            ModelCard(id=embedding["model"], created=self._started, owned_by="riverbed"),
            ModelCard(id=answers, created=self._started, owned_by=owner),
        ]

    # DOCUMENTS
    @app.post(
        "/v1/documents",
        status_code=202,
        response_model=DocumentsResponse,
        responses=BODY_ERRORS,
        dependencies=WRITE,
        openapi_extra=documents_body(MAX_DOCUMENTS_PER_REQUEST),  # the handler reads the body raw
    )
    async def post_documents(self, request: Request) -> DocumentsResponse:
        """Produces envelopes (one, a list, or `{"documents": [...]}`) onto their topic, keyed by id."""
        try:  # strict: NaN and Infinity are not JSON, and no store could hold them
            payload = loads_json(await request.body())
        except ValueError as exc:  # also json.JSONDecodeError and UnicodeDecodeError
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ApiError(
                400, "invalid_json", "the body is not JSON we can read: nested too deeply"
            ) from exc
        if isinstance(payload, dict) and "documents" in payload and "kind" not in payload:
            payload = payload["documents"]
        items = payload if isinstance(payload, list) else [payload]
        if not items:
            raise ApiError(400, "invalid_request", "no documents given", "documents")
        if len(items) > MAX_DOCUMENTS_PER_REQUEST:
            message = f"{len(items)} documents; at most {MAX_DOCUMENTS_PER_REQUEST} per request"
            raise ApiError(400, "invalid_request", message, "documents")
        envelopes = []
        for i, item in enumerate(items):
            try:  # a valid envelope can be encoded and stored: its strings and numbers are checked
                envelopes.append(validate_envelope(item))
            except InvalidEnvelopeError as exc:
                where = f"documents[{i}]"
                param = f"{where}.{exc.field}" if exc.field else where
                raise ApiError(400, "invalid_envelope", f"{where}: {exc}", param) from exc
        return DocumentsResponse(records=await self._produce(envelopes))

    @app.delete(
        "/v1/documents/{document_id:anypath}",
        status_code=202,
        response_model=DocumentsResponse,
        responses=PATH_ERRORS,
        dependencies=WRITE,
    )
    async def delete_document(self, document_id: str, request: Request) -> DocumentsResponse:
        """Produces a delete for the document: every chunk of it goes, everywhere."""
        _check_path_utf8(request, "document_id")
        try:
            envelope = DocumentEnvelope(id=document_id, op="delete")
        except ValueError as exc:
            raise ApiError(400, "invalid_request", f"document id: {exc}", "document_id") from exc
        return DocumentsResponse(records=await self._produce([envelope]))

    @app.get(
        "/v1/documents/{document_id:anypath}",
        response_model=DocumentStatus,
        responses=PATH_ERRORS,
        dependencies=READ,
    )
    async def get_document(self, document_id: str, request: Request) -> DocumentStatus:
        """Whether the document (or else the image) is indexed, its chunk count and the record its
        content came from; `kind` says which it is."""
        _check_path_utf8(request, "document_id")
        info = await self._call(self.retriever.document.remote(document_id))
        source = info.get("source")
        return DocumentStatus(
            id=document_id,
            kind=info.get("kind"),
            indexed=info["chunks"] > 0,
            chunks=info["chunks"],
            content_hash=info.get("content_hash"),
            source=ProducedRecord(
                id=document_id, op="upsert", topic=source[0], partition=source[1], offset=source[2]
            )
            if source
            else None,
        )

    # KNOWLEDGE GRAPH
    @app.get(
        "/v1/graph/entities",
        response_model=GraphEntitiesResponse,
        responses=GRAPH_GET_ERRORS,
        dependencies=READ,
    )
    async def graph_entities(
        self,
        q: str = Query(min_length=1, description="a prefix of the entity's name or of one of its words"),
        limit: int = Query(20, ge=1, le=1000, description="entities at most"),
    ) -> GraphEntitiesResponse:
        """Entities whose normalised name, or a word of it, starts with `q`: the most connected
        first (name, label, aliases, mentions, degree)."""
        self._check_text(q, "q")
        found = await self._call(self.retriever.graph_entities.remote(q, limit))
        return GraphEntitiesResponse(entities=found)

    @app.get(
        "/v1/graph/entities/{name:anypath}",
        response_model=GraphEntityResponse,
        responses=GRAPH_GET_ERRORS,
        dependencies=READ,
    )
    async def graph_entity(
        self,
        name: str,
        request: Request,
        limit: int = Query(50, ge=1, le=1000, description="mentions and neighbours at most"),
    ) -> GraphEntityResponse:
        """The entity (by its name as written, or its normalised key), where it is mentioned (chunk,
        document, span) and its neighbours with their relations and supporting chunks; 404 when the
        graph has no such entity."""
        _check_path_utf8(request, "name")
        self._check_text(name, "name")
        return GraphEntityResponse(**await self._call(self.retriever.graph_entity.remote(name, limit)))

    @app.post(
        "/v1/graph/query",
        response_model=GraphQueryResponse,
        responses=GRAPH_BODY_ERRORS,
        dependencies=READ,
    )
    async def graph_query(self, request: GraphQueryRequest) -> GraphQueryResponse:
        """`{"entity", "hops"}`: the entities within 1 to 3 hops and the edges among them, each with
        its evidence chunks. `{"path": {"from", "to"}, "max_hops"}`: the shortest paths joining two
        entities, every relation of each step with its evidence. 404 naming the entity the graph
        does not have."""
        if request.entity is not None:
            self._check_text(request.entity, "entity")
            found = await self._call(
                self.retriever.graph_neighbourhood.remote(request.entity, request.hops, request.limit)
            )
            return GraphQueryResponse(**found)
        assert request.path is not None  # the request's validation: one of the two
        self._check_text(request.path.from_, "path.from")
        self._check_text(request.path.to, "path.to")
        paths = await self._call(
            self.retriever.graph_paths.remote(
                request.path.from_, request.path.to, request.max_hops, request.limit
            )
        )
        return GraphQueryResponse(paths=paths)

    # OPERATIONS
    @app.get("/healthz", responses=HEALTH_RESPONSES)
    async def healthz(self) -> JSONResponse:
        """200 ``{"status": "ok", ...}`` when every shard is ok and no running source is stalled;
        otherwise 503 with ``status`` ``degraded`` or ``unavailable`` and ``problems`` naming each
        shard or source in trouble (e.g. a full disk on shard 1). O(1) per shard and source."""
        shards, (sources, source_problems), graph = await asyncio.gather(
            self._shard_health(), self._sources(), self._graph_health()
        )
        status, body = health_report(self.settings.index.name, shards, sources, source_problems, graph)
        return JSONResponse(body, status)

    @app.get(
        "/metrics",
        dependencies=[Depends(require_metrics)],
        responses=METRICS_RESPONSES,
        response_class=PlainTextResponse,
    )
    async def metrics(self) -> Response:
        """Prometheus text: requests and latency per route, consumer lag, per-shard chunks, vectors
        and health, and the sources' counters, retries by phase and stalls."""
        offsets, shards, (sources, _) = await asyncio.gather(
            self._offsets(), self._shard_stats(), self._sources()
        )
        dead: dict[str, int] = {}
        for source in sources:
            for reason, n in (source.get("dead_letters") or {}).items():
                dead[reason] = dead.get(reason, 0) + n
        # Without the broker there are no offsets (no lag figures); everything else still renders.
        snapshot = {"index": self.settings.index.name, **(offsets or {}), "shards": shards,
                    "sources": sources, "dead_letters": dead}  # fmt: skip
        return Response(http_metrics().render(snapshot), media_type=CONTENT_TYPE)

    # HELPERS
    def _check_k(self, k: int | None, default: int) -> int:
        k = default if k is None else k
        if not 1 <= k <= self.search_config.max_k:
            raise ApiError(
                400, "invalid_request", f"k must be between 1 and {self.search_config.max_k}, got {k}", "k"
            )
        return k

    def _check_text(self, text: str, param: str) -> None:
        limit = self.search_config.max_query_chars
        if len(text) > limit:
            raise ApiError(
                400, "invalid_request", f"{param} has {len(text)} characters; at most {limit}", param
            )

    async def _call(self, response: Any) -> Any:
        """Awaits a deployment call; errors with an HTTP meaning become :class:`ApiError`."""
        try:
            return await response
        except Exception as exc:
            known = as_api_error(exc)
            if known is not None:
                raise known from exc
            raise

    async def _retrieve(
        self, query: str, k: int, filter: MetadataFilter | None, mode: str, modalities: list[Modality]
    ) -> list[Ranked]:
        """The top ``k`` for ``query`` over ``modalities``, each hit tagged with its modality.
        Passages alone take one call to the retriever, which embeds and searches in batches;
        images need the image model's vectors (503 while it cannot be loaded) except in keyword
        mode, which reads captions only."""
        if modalities == ["text"]:  # one call: the retriever embeds the query too
            ranked: list[Ranked] = await self._call(
                self.retriever.search.remote(query, None, k, filter, mode)
            )
            return ranked
        vectors: dict[Modality, Any] = {m: None for m in modalities}
        same_space = False
        if mode != "keyword":
            same_space = (await self._image_model())["same_space"]
            text_vector = None
            if "text" in modalities or same_space:
                text_vector = self._call(self.retriever.embed.remote(query))
            image_vector = None if same_space else self._call(self.image_embedder.embed_text.remote(query))
            text, image = await asyncio.gather(_awaited(text_vector), _awaited(image_vector))
            vectors = {m: (image if m == "image" and not same_space else text) for m in modalities}
        if len(modalities) == 1:
            [side] = modalities
            ranked = await self._call(
                self.retriever.search.remote(query, vectors[side], k, filter, mode, side)
            )
            return ranked
        ranked = await self._call(
            self.retriever.search_modalities.remote(query, vectors, k, filter, mode, modalities, same_space)
        )
        return ranked

    async def _image_model(self) -> dict[str, Any]:
        """The image model's ``describe()`` (its text space), asked once it has loaded; 503
        ``model_unavailable`` while it cannot be."""
        if self._image_model_info is None:
            self._image_model_info = await self._call(self.image_embedder.describe.remote())
        return self._image_model_info

    async def _describe(self) -> dict[str, Any]:
        if self._model is None or self.settings.index.alias is not None:  # an alias may move
            self._model = await self._call(self.retriever.describe.remote())
        return self._model

    async def _produce(self, envelopes: list[DocumentEnvelope | ImageEnvelope]) -> list[ProducedRecord]:
        """Produces ``envelopes`` and says where each landed. Sizes are checked before anything is
        sent (a 413 produces none of them). A broker that is down or does not answer within
        :data:`BROKER_WAIT_S` is a 503 ``broker_unavailable``; the producer that failed is dropped,
        so the next request builds a fresh one."""
        from kafka.errors import KafkaError

        records = [self._record(i, env) for i, env in enumerate(envelopes)]
        build = self._producer_build()
        try:
            producer = await asyncio.shield(build)  # one client leaving does not cancel others' build
            return await asyncio.to_thread(self._produce_blocking, producer, records)
        except KafkaError as exc:
            self._drop_producer(build)
            message = f"the broker ({self.servers}) did not take the documents: {type(exc).__name__}: {exc}"
            raise ApiError(503, "broker_unavailable", f"{message}; retry shortly") from exc

    def _record(self, i: int, env: DocumentEnvelope | ImageEnvelope) -> _Record:
        """``env`` as (envelope, topic, key, value); 413 naming it when it is over the record limit."""
        key, value = encode_envelope(env)
        limit = self.settings.kafka.max_record_bytes
        if len(value) > limit:
            message = f"document {env.id!r} is {len(value)} bytes encoded; the limit is {limit}"
            raise ApiError(413, "body_too_large", message, f"documents[{i}]")
        topics = self.settings.kafka.topics
        return env, topics.images if isinstance(env, ImageEnvelope) else topics.documents, key, value

    def _producer_build(self) -> asyncio.Future[Any]:
        """The build of this replica's producer, started on first use and again after one failed:
        concurrent requests share a build, so a dead broker costs each of them one wait, not one
        per request ahead of it. Called on the event loop only (no await between check and set)."""
        build = self._producer
        if build is None or (build.done() and (build.cancelled() or build.exception() is not None)):
            build = self._producer = asyncio.ensure_future(asyncio.to_thread(self._make_producer))
        return build

    def _drop_producer(self, build: asyncio.Future[Any]) -> None:
        """Forgets a producer whose send failed and closes it in the background, leaving other
        requests' sends on it :data:`BROKER_WAIT_S` to finish."""
        if self._producer is build:
            self._producer = None
        if build.done() and not build.cancelled() and build.exception() is None:
            threading.Thread(target=build.result().close, args=(BROKER_WAIT_S,), daemon=True).start()

    def _make_producer(self) -> Any:
        """A producer that waits at most :data:`BROKER_WAIT_S` for the broker at each step (its
        defaults wait 30 s to connect and 60 s for metadata); raises ``KafkaTimeoutError`` when the
        broker cannot be reached in that time."""
        from kafka import KafkaProducer

        wait_ms = int(BROKER_WAIT_S * 1000)
        return KafkaProducer(
            bootstrap_servers=self.servers,
            client_id=f"riverbed-http-{self.settings.index.name}",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=self.settings.kafka.max_record_bytes + 64 * 1024,
            bootstrap_timeout_ms=wait_ms,
            max_block_ms=wait_ms,
        )

    def _produce_blocking(self, producer: Any, records: list[_Record]) -> list[ProducedRecord]:
        """Sends every record, then waits for their acknowledgements, all within
        :data:`BROKER_WAIT_S` of the last send; raises ``KafkaError`` (``KafkaTimeoutError`` when
        time runs out)."""
        sent = [(env, topic, producer.send(topic, key=k, value=v)) for env, topic, k, v in records]
        deadline = time.monotonic() + BROKER_WAIT_S
        produced = []
        for env, topic, future in sent:
            meta = future.get(timeout=max(0.0, deadline - time.monotonic()))
            where = {"topic": topic, "partition": meta.partition, "offset": meta.offset}
            produced.append(ProducedRecord(id=env.id, op=env.op, **where))
        return produced

    async def _shard_health(self) -> list[dict[str, Any]]:
        """Every shard's health; all ``unavailable`` when the retriever itself cannot answer."""
        return await self._per_shard(self.retriever.health.remote())

    async def _shard_stats(self) -> list[dict[str, Any]]:
        """Every shard's health and figures, as :meth:`_shard_health`."""
        return await self._per_shard(self.retriever.stats.remote())

    async def _graph_health(self) -> list[dict[str, Any]]:
        """The knowledge graph's shards' health (``[]`` without ``graph.enabled``), as
        :meth:`_shard_health`."""
        if not self.settings.graph.enabled:
            return []
        return await self._per_shard(self.retriever.graph_health.remote(), self.settings.graph.n_shards)

    async def _per_shard(self, response: Any, n_shards: int | None = None) -> list[dict[str, Any]]:
        try:
            shards: list[dict[str, Any]] = await asyncio.wait_for(self._call(response), HEALTH_TIMEOUT_S)
            return shards
        except Exception as exc:  # the retriever replica is down or overloaded: no shard answers
            reason = exc.message if isinstance(exc, ApiError) else f"the retriever did not answer ({exc!r})"
            return [
                {"shard": i, "status": "unavailable", "problem": reason}
                for i in range(self.settings.index.n_shards if n_shards is None else n_shards)
            ]

    async def _sources(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The running sources' ``stats()`` (each with ``source``: its number), and a problem for
        each source that runs but did not answer within :data:`SOURCE_STATS_TIMEOUT_S`. A source
        that is not running (no ingest, or one that ended) is neither."""
        found = await asyncio.gather(*(self._source(i) for i in range(self.settings.ingest.sources)))
        stats = [f for f in found if isinstance(f, dict)]
        return stats, [f for f in found if isinstance(f, str)]

    async def _source(self, i: int) -> dict[str, Any] | str | None:
        s = self.settings
        name = actor_name(s.index.name, "source", i)
        try:
            actor = await asyncio.to_thread(ray.get_actor, name, namespace=s.ray.namespace)
        except ValueError:
            return None  # no ingest running: lag and the index figures still tell
        try:
            stats: dict[str, Any] = await asyncio.wait_for(actor.stats.remote(), SOURCE_STATS_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:
            return None  # it ended (stopped or replaced) between the lookup and the call
        except TimeoutError:
            return f"source {i}: did not answer its stats within {SOURCE_STATS_TIMEOUT_S:g} s"
        except ray.exceptions.RayError as exc:  # restarting, or its worker crashed
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"source {i}: its actor is unreachable ({detail})"
        return {**stats, "source": i}

    async def _offsets(self) -> dict[str, Any] | None:
        """``{"committed", "ends"}`` of the index's consumer group, or None when the broker does not
        answer in time."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._offsets_blocking), HEALTH_TIMEOUT_S)
        except Exception as exc:
            log.warning("metrics: consumer offsets unavailable: %s", exc)
            return None

    def _offsets_blocking(self) -> dict[str, Any]:
        from actors.kafka_offsets import committed_offsets, end_offsets

        s = self.settings
        return {
            "committed": committed_offsets(self.servers, s.consumer_group, timeout_s=5),
            "ends": end_offsets(self.servers, [s.kafka.topics.documents]),
        }
