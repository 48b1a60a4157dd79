"""The HTTP surface's request and response bodies.

Requests forbid unknown fields (a misspelt ``fliter`` is an error, not a silently ignored
option), except the OpenAI-compatible embeddings request, which OpenAI clients send with extra
fields. Types are strict: ``k`` is a JSON integer (``true``, ``5.0`` and ``"5"`` are refused, not
read as 1 and 5) and ``explain`` a JSON boolean. Limits that depend on the configuration (``k``'s
maximum, the query length) are checked by the ingress, which names the field in its error. Request
strings hold no lone surrogate (like an envelope's, see :mod:`schemas.envelope`): the tokenizer and
the stores cannot take one, so it is a 400 naming the field, not a failure deeper in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from schemas.envelope import StorableStr
from schemas.filters import MetadataFilter
from schemas.metadata import MetadataValue, string_problem
from schemas.topology import SearchMode

T = TypeVar("T")
Text = Annotated[StorableStr, Field(min_length=1)]
Modality = Literal["text", "image"]
"""What a hit is: a passage of a document (the index) or an image (the index's images index)."""
MODALITIES: tuple[Modality, ...] = ("text", "image")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_blank(value: str, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} must not be empty or blank")
    return value


def _one_of(value: T, info: ValidationInfo, other: str, choice: str) -> T:
    """A validator of the second of two fields exactly one of which is given: ``other`` (already
    validated) or this one; ``choice`` says the two in an error."""
    if other not in info.data:
        return value  # the other field itself is wrong: its own error says so
    has_other = info.data[other] is not None
    if value is not None and has_other:
        raise ValueError(f"give {choice}, not both")
    if value is None and not has_other:
        raise ValueError(f"required when there is no {other}: give {choice}")
    return value


def _text_only() -> list[Modality]:
    return ["text"]


def _modalities(value: list[Modality]) -> list[Modality]:
    if not value:
        raise ValueError('modalities must name at least one of "text", "image"')
    repeated = sorted({m for m in value if value.count(m) > 1})
    if repeated:
        raise ValueError(f"modalities repeats {', '.join(map(repr, repeated))}")
    return value


class SearchRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"query": "Who designed the first AC motor?", "k": 5}]}
    )

    query: Text
    k: StrictInt | None = Field(None, description="hits to return (default: serve.search.default_k)")
    filter: MetadataFilter | None = Field(
        None, description='metadata conditions, e.g. {"lang": "en", "year": {"gte": 2000}}'
    )
    mode: SearchMode = "hybrid"
    explain: StrictBool = Field(False, description="add each hit's score breakdown")
    modalities: list[Modality] = Field(
        default_factory=_text_only,
        description='what to search: "text" (passages of documents), "image" (images: their captions and '
        "the image model's vectors), or both, ranked together; each hit says its `modality`",
    )

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        return _not_blank(v, "query")

    _check_modalities = field_validator("modalities")(_modalities)


class RagRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"question": "Who designed the first alternating current motor?"}]}
    )

    question: Text
    k: StrictInt | None = Field(None, description="passages given to the generator (default: serve.rag.k)")
    filter: MetadataFilter | None = None
    mode: SearchMode | None = Field(None, description="retrieval mode (default: serve.rag.mode)")
    explain: StrictBool = False
    modalities: list[Modality] = Field(
        default_factory=_text_only,
        description='passages from "text" (documents), "image" (each image as its caption and metadata) '
        "or both; citations say which",
    )

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        return _not_blank(v, "question")

    _check_modalities = field_validator("modalities")(_modalities)


class ImageSearchRequest(_Request):
    """Images like a text (``query``) or like an image (``image_b64``): exactly one of the two.
    ``target: "text"`` turns an image query into passages of the text index."""

    query: Text | None = Field(None, description="text to find images for (text -> image)")
    image_b64: Text | None = Field(
        None,
        validate_default=True,
        description="a base64 PNG, JPEG, WebP or GIF to find similar images (or passages) for",
    )
    k: StrictInt | None = Field(None, description="hits to return (default: serve.search.default_k)")
    filter: MetadataFilter | None = Field(None, description="metadata conditions, as in /v1/search")
    target: Modality = Field(
        "image",
        description='"image": images; "text": passages of the text index, for an image query (needs an '
        "image model that shares the text index's space)",
    )

    @field_validator("query")
    @classmethod
    def _query(cls, v: str | None) -> str | None:
        return None if v is None else _not_blank(v, "query")

    @field_validator("image_b64")
    @classmethod
    def _one_query(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _one_of(v, info, "query", "query (a text) or image_b64 (an image)")

    @field_validator("target")
    @classmethod
    def _target(cls, v: Modality, info: ValidationInfo) -> Modality:
        if v == "text" and info.data.get("query") is not None:
            raise ValueError(
                'target "text" takes an image query (image_b64); search passages by text with POST /v1/search'
            )
        return v


class Explanation(BaseModel):
    """How a hit's score came about: each retriever's rank (1-based) and score, and the fusion."""

    vector_rank: int | None = None
    vector_score: float | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    fused_score: float | None = None
    rerank_score: float | None = Field(
        None, description="serve.search.rerank: the cross-encoder's score, which ordered the reranked hits"
    )
    graph_rank: int | None = Field(
        None, description="mode graph: the hit's rank in the knowledge graph's ranking"
    )
    graph_entities: list[str] = Field(
        default_factory=list,
        description="mode graph: the entities (the query's, or their neighbours) that brought the hit in",
    )
    matched_terms: list[dict[str, Any]] = Field(
        default_factory=list,
        description="query words found in the chunk: {term, start, end, text_start, text_end}; the document's"
        " text[start:end] is the word as sent (null when the chunk predates alignments), text[text_start:"
        "text_end] the word in the hit's text",
    )


class SearchHit(BaseModel):
    """A passage, or an image (``modality: "image"``: its caption is ``text``, its id
    ``document_id`` and ``image_id``, and its chunk ``<image id>#0``)."""

    chunk_id: str
    document_id: str
    title: str | None
    text: str
    span: tuple[int, int] = Field(
        description="code points [start, end) of the document's text (an image's: of its caption)"
    )
    score: float
    metadata: dict[str, MetadataValue]
    explanation: Explanation | None = None
    modality: Modality = "text"
    image_id: str | None = Field(None, description="images: the image's id")
    uri: str | None = Field(None, description="images: where the image was read from (null: sent inline)")
    thumbnail_b64: str | None = Field(None, description="images: a small JPEG of the image, base64")


class ImageHit(BaseModel):
    image_id: str
    score: float = Field(description="cosine similarity with the query in the image model's space")
    caption: str | None
    metadata: dict[str, MetadataValue]
    uri: str | None = Field(description="where the image was read from; null when it was sent inline")
    thumbnail_b64: str | None = Field(description="a small JPEG of the image, base64")


class ImageSearchResponse(BaseModel):
    query: str | None = Field(description="the text query (null for an image query)")
    target: Modality
    k: int
    hits: list[ImageHit | SearchHit] = Field(
        description='images (target "image"), or passages shaped as /v1/search hits (target "text")'
    )
    took_ms: float


class SearchResponse(BaseModel):
    query: str
    mode: SearchMode
    k: int
    hits: list[SearchHit]
    took_ms: float


class Citation(BaseModel):
    number: int = Field(description="the passage number the answer cites ([1] is the first)")
    chunk_id: str
    document_id: str
    span: tuple[int, int] = Field(description="code points of the document's text that support the answer")
    text: str = Field(description="the cited passage")
    modality: Modality = "text"
    image_id: str | None = Field(None, description="images: the cited image's id")
    uri: str | None = Field(None, description="images: where the cited image was read from")


class RagResponse(BaseModel):
    question: str
    answer: str
    abstained: bool
    reason: str | None = Field(None, description="why the answer abstained")
    citations: list[Citation]
    passages: list[SearchHit] = Field(description="the passages the generator was given, in prompt order")
    model: str
    took_ms: float


class EmbeddingsRequest(BaseModel):
    """OpenAI's ``POST /v1/embeddings`` body. Token-id input is refused: ids from another tokenizer
    (OpenAI's) mean nothing to this model. Unknown fields are kept (OpenAI clients send more than
    this server reads); the known ones are as strict as every other request's."""

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        json_schema_extra={"examples": [{"input": ["a first passage to embed", "a second one"]}]},
    )

    input: StorableStr | list[StorableStr]
    model: StorableStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StorableStr | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _strings_only(cls, v: Any) -> Any:
        """Checked before the type so that an error names the item (``input[2]``) rather than
        each branch of ``str | list[str]`` that failed."""
        if isinstance(v, list) and v and all(isinstance(x, int | list) for x in v):
            raise ValueError(
                "token-id input is not supported (ids of another tokenizer mean nothing to this model): "
                "send strings (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"
            )
        items = enumerate(v) if isinstance(v, list) else [(None, v)]
        for i, item in items:
            where = "input" if i is None else f"input[{i}]"
            if not isinstance(item, str):
                raise ValueError(f"{where} must be a string, got {_json_type(item)}")
            if (problem := string_problem(item)) is not None:
                raise ValueError(f"{where} {problem}")
        return v


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingsUsage


class ModelCard(BaseModel):
    """A served model, as OpenAI's ``GET /v1/models`` lists one."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when this server started serving it (Unix seconds)")
    owned_by: str = Field(description="what serves it: `riverbed` (in process) or the generator's endpoint")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ProducedRecord(BaseModel):
    id: str
    op: Literal["upsert", "delete"]
    topic: str
    partition: int
    offset: int


class DocumentsResponse(BaseModel):
    """Where each envelope landed on the topic. It is searchable once the pipeline has committed
    past that offset (``GET /v1/documents/{id}`` tells)."""

    records: list[ProducedRecord]


class DocumentStatus(BaseModel):
    id: str
    kind: Literal["document", "image"] | None = Field(
        None, description="what the id names in the index: a document or an image (null: neither)"
    )
    indexed: bool
    chunks: int = Field(description="chunks stored for the document, over all shards")
    content_hash: str | None = None
    source: ProducedRecord | None = Field(None, description="the record whose content is indexed")


MAX_GRAPH_HOPS = 3
MAX_PATH_HOPS = 6


class GraphPath(_Request):
    from_: Text = Field(
        alias="from", description="the entity a path starts at (a name, as written or as a key)"
    )
    to: Text = Field(description="the entity it ends at")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GraphQueryRequest(_Request):
    """``entity`` and ``hops`` (the neighbourhood), or ``path`` and ``max_hops`` (the shortest paths
    between two entities): exactly one of ``entity`` and ``path``."""

    entity: Text | None = Field(None, description="the entity whose neighbourhood to return")
    hops: StrictInt = Field(1, ge=1, le=MAX_GRAPH_HOPS, description="how far from the entity (1 to 3)")
    path: GraphPath | None = Field(None, validate_default=True, description="two entities to join")
    max_hops: StrictInt = Field(4, ge=1, le=MAX_PATH_HOPS, description="the longest path returned (edges)")
    limit: StrictInt = Field(50, ge=1, le=1000, description="entities (neighbourhood) or paths at most")

    @field_validator("path")
    @classmethod
    def _one_query(cls, v: GraphPath | None, info: ValidationInfo) -> GraphPath | None:
        return _one_of(v, info, "entity", "entity (a neighbourhood) or path (two entities to join)")


class GraphEntity(BaseModel):
    key: str = Field(description="the entity's normalised name: its identity in the graph")
    name: str = Field(description="its most frequent name as written")
    label: str | None = Field(
        description="its most frequent entity label (PERSON, ORG, GPE...; TITLE: a document title)"
    )
    aliases: list[str] = Field(description="its other names as written")
    mentions: int = Field(description="chunks mentioning it (counted once per mention)")
    degree: int = Field(description="distinct entities it is related to")


class GraphEntitiesResponse(BaseModel):
    entities: list[GraphEntity]


class GraphMention(BaseModel):
    chunk_id: str
    document_id: str
    name: str
    label: str
    span: list[int] = Field(description="[start, end): code points of the document's text")
    sentence: list[int] = Field(description="the span of the sentence it is in")


class GraphNeighbour(BaseModel):
    entity: str
    relation: str = Field(description="a verb (with its preposition), co_occurs or mentions")
    direction: Literal["out", "in"] = Field(description="out: this entity -> the neighbour")
    chunks: list[str] = Field(description="chunk ids whose sentences state it")


class GraphEntityResponse(BaseModel):
    entity: GraphEntity
    mentions: list[GraphMention]
    neighbours: list[GraphNeighbour]


class GraphNode(GraphEntity):
    distance: int = Field(description="hops from the entity asked about")


class GraphEdge(BaseModel):
    source: str
    target: str
    relation: str
    chunks: list[str]


class GraphPathResult(BaseModel):
    nodes: list[str]
    steps: list[list[GraphEdge]] = Field(description="per step, every relation joining its two entities")


class GraphQueryResponse(BaseModel):
    nodes: list[GraphNode] = Field(default_factory=list, description="entity queries: the neighbourhood")
    edges: list[GraphEdge] = Field(default_factory=list)
    paths: list[GraphPathResult] = Field(default_factory=list, description="path queries: the shortest paths")


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
