"""How a Milvus shard is laid out: collection names, schemas, indexes, and the rows of both
collections (see :mod:`actors.milvus_index` for what they hold and the order they are written in).

Each shard is two collections, ``<prefix>_<index>_<shard>_chunks`` and ``..._ledger``. The index
name is written so that distinct names never share collections (``_`` becomes ``__`` and ``-``
``_h``: ``my_index`` is ``my__index``, ``my-index`` ``my_hindex``), and the ledger's meta row names
its index and shard, so that a store reached under another name is refused.

Ledger rows are keyed ``meta`` (the store's identity), ``owner`` (the writer that opened it
last), ``d:<document id>`` (a document's row and version) and ``o:<[topic, partition]>`` (the
next offset of a partition).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from actors.milvus_words import BM25
from actors.vector_index import ChunkRecord, DocumentRow, Hit
from schemas.errors import ConfigError, ProcessingError
from schemas.filters import MetadataFilter, milvus_kinds, milvus_literal
from schemas.ids import split_chunk_id
from schemas.settings import MilvusConfig
from schemas.topology import Offsets, Version

T = TypeVar("T")

DB_NAME = "milvus.db"  # Milvus Lite's data dir in the shard directory (Lite wants the .db suffix)
FORMAT = 1  # the layout of the collections; a newer one is refused
MAX_VARCHAR_BYTES = 65535  # Milvus's largest VARCHAR, counted in UTF-8 bytes
MAX_ID_BYTES = 4096  # chunk and document ids
MAX_JSON_BYTES = 65536  # Milvus's largest JSON value
MAX_TOP_K = 16384  # Milvus's largest search limit
BATCH = 256  # ids per ``in [...]`` expression, rows per write
SCAN_BATCH = 4096  # rows per page of a scan
# Bytes per upsert: well under a Milvus server's gRPC limit (64 MiB by default), which would
# otherwise refuse a batch of 256 chunks near their size limits.
MAX_BATCH_BYTES = 16 << 20
PLACEHOLDER = [1.0, 0.0]  # the ledger's vector: Milvus wants one per collection
META, OWNER, DOCUMENT, VERSION_ONLY, OFFSET = "meta", "owner", "document", "version", "offset"
# The stored columns of a chunk, in ChunkRecord's order (what get and search read back).
CHUNK_FIELDS = [
    "chunk_id", "document_id", "number", "text", "title", "span_start", "span_end", "metadata",
    "vector", "alignment",
]  # fmt: skip
HIT_FIELDS = [f for f in CHUNK_FIELDS if f != "vector"]


def collection_names(config: MilvusConfig, index_name: str, shard: int) -> tuple[str, str]:
    """The names of shard ``shard``'s chunks and ledger collections (no index part when the index
    is unnamed). Distinct ``(index_name, shard)`` give distinct names: see the module doc."""
    encoded = index_name.replace("_", "__").replace("-", "_h")
    base = "_".join(p for p in (config.collection_prefix, encoded) if p)
    return f"{base}_{shard}_chunks", f"{base}_{shard}_ledger"


# -- indexes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """An index of one field, named after the field. ``follow``: rebuilt when the stored one was
    built otherwise (the vector index follows the config; the others never change)."""

    field: str
    index_type: str
    metric: str
    build: Mapping[str, Any]
    follow: bool = False

    def params(self) -> dict[str, Any]:
        """The index parameters in both forms Milvus reads: build parameters as top-level keys
        (what servers read) and under ``params`` (the only place Milvus Lite 3.2 reads them)."""
        build = dict(self.build)
        return {"index_type": self.index_type, "metric_type": self.metric, **build} | (
            {"params": build} if build else {}
        )

    def built_as(self, info: Mapping[str, Any]) -> bool:
        """Whether ``describe_index``'s ``info`` shows this type and build parameters."""
        params = {**info, **(info.get("params") or {})}  # a server answers them flat, Lite nested
        return str(info.get("index_type")) == self.index_type and all(
            str(params.get(k)) == str(v) for k, v in self.build.items()
        )


def chunk_indexes(config: MilvusConfig) -> list[IndexSpec]:
    """The vector index ``config`` asks for, then the two BM25 indexes."""
    build: dict[str, Any] = {}
    if config.index_type == "HNSW":
        build = {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
    elif config.index_type == "IVF_FLAT":
        build = {"nlist": config.ivf_nlist}
    return [
        IndexSpec("vector", config.index_type, "IP", build, follow=True),
        IndexSpec("text_bm25", "SPARSE_INVERTED_INDEX", "BM25", BM25),
        IndexSpec("title_bm25", "SPARSE_INVERTED_INDEX", "BM25", BM25),
    ]


LEDGER_INDEXES = [IndexSpec("placeholder", "FLAT", "IP", {})]


def search_params(config: MilvusConfig, k: int) -> dict[str, Any]:
    """The vector search parameters of ``config`` for a top ``k``."""
    params: dict[str, Any] = {}
    if config.index_type == "HNSW":  # an ef below k would return fewer than k hits
        params = {"ef": max(config.hnsw_ef_search, min(k, MAX_TOP_K))}
    elif config.index_type == "IVF_FLAT":
        params = {"nprobe": config.ivf_nprobe}
    return {"metric_type": "IP", "params": params}


# -- schemas -------------------------------------------------------------------------------


def chunks_schema(client: Any, dim: int, analyzer: Mapping[str, Any]) -> Any:
    """The chunks collection: one row per chunk, its BM25 vectors derived by Milvus from its words."""
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("document_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
    schema.add_field("number", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES)
    schema.add_field("title", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES, nullable=True)
    schema.add_field("span_start", DataType.INT64)
    schema.add_field("span_end", DataType.INT64)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("kinds", DataType.JSON)
    schema.add_field("alignment", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES, nullable=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for field in ("text", "title"):
        schema.add_field(
            f"{field}_words",
            DataType.VARCHAR,
            max_length=MAX_VARCHAR_BYTES,
            enable_analyzer=True,
            analyzer_params=dict(analyzer),
        )
        schema.add_field(f"{field}_bm25", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(f"{field}_bm25", FunctionType.BM25, [f"{field}_words"], [f"{field}_bm25"])
        )
    return schema


def ledger_schema(client: Any) -> Any:
    """The ledger collection: one JSON value per key."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=2 * MAX_ID_BYTES)
    schema.add_field("kind", DataType.VARCHAR, max_length=16)
    schema.add_field("value", DataType.JSON)
    schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=len(PLACEHOLDER))
    return schema


def vector_dim(description: Mapping[str, Any]) -> int | None:
    """The dim of the ``vector`` field in ``describe_collection``'s answer."""
    for field in description.get("fields", []):
        if field.get("name") == "vector":
            return int(field["params"]["dim"])
    return None


# -- chunk rows ----------------------------------------------------------------------------


def chunk_row(
    record: ChunkRecord, vector: np.ndarray, text_words: list[str], title_words: list[str], where: str
) -> tuple[dict[str, Any], int]:
    """The Milvus row of ``record`` and its size in bytes (about what it takes on the wire).
    :class:`ProcessingError` naming the value Milvus cannot store."""
    row: dict[str, Any] = {
        "chunk_id": record.chunk_id,
        "document_id": record.document_id,
        "number": record.number,
        "text": record.text,
        "title": record.title,
        "span_start": record.start,
        "span_end": record.end,
        "metadata": dict(record.metadata),
        "kinds": milvus_kinds(record.metadata),
        "alignment": record.alignment,
        "vector": vector,
        "text_words": " ".join(text_words),
        "title_words": " ".join(title_words),
    }
    check_id(record.chunk_id, where)  # the document id is a part of it
    size = len(record.chunk_id.encode()) + len(record.document_id.encode()) + 4 * len(vector) + 64
    texts = {
        "text": record.text,
        "title": record.title,
        "alignment": record.alignment,
        "text_words": row["text_words"],
        "title_words": row["title_words"],
    }
    for field, text in texts.items():
        n = len((text or "").encode())
        if n > MAX_VARCHAR_BYTES:
            raise ProcessingError(
                f"{where}: {field} is {n} bytes in UTF-8, over the {MAX_VARCHAR_BYTES} Milvus stores"
            )
        size += n
    for field in ("metadata", "kinds"):
        n = len(json.dumps(row[field], ensure_ascii=False).encode())
        if n > MAX_JSON_BYTES:
            raise ProcessingError(f"{where}: {field} is {n} bytes as JSON, over Milvus's {MAX_JSON_BYTES}")
        size += n
    return row, size


def check_id(an_id: str, where: str) -> None:
    if len(an_id.encode()) > MAX_ID_BYTES:
        raise ProcessingError(f"{where}: the id is over {MAX_ID_BYTES} bytes, the most Milvus stores here")


def content(record: ChunkRecord) -> tuple[Any, ...]:
    """What makes two stored chunks the same: every field, metadata as canonical JSON (so that
    ``true`` and ``1`` differ, as they do for filters) and the vector's bytes."""
    metadata = json.dumps(record.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (*record.without_vector()[:7], metadata, record.alignment, record.vector.tobytes())


def record(row: Mapping[str, Any]) -> ChunkRecord:
    return ChunkRecord(
        row["chunk_id"],
        row["document_id"],
        int(row["number"]),
        row["text"],
        row["title"],
        int(row["span_start"]),
        int(row["span_end"]),
        row["metadata"],
        np.asarray(row["vector"], dtype=np.float32),
        row["alignment"],
    )


def hit(row: Mapping[str, Any], score: float) -> Hit:
    return Hit(
        row["chunk_id"],
        row["document_id"],
        int(row["number"]),
        row["text"],
        row["title"],
        int(row["span_start"]),
        int(row["span_end"]),
        dict(row["metadata"]),
        score,
        row["alignment"],
    )


def document_of(chunk_id: str) -> str | None:
    try:
        return split_chunk_id(chunk_id)[0]
    except ValueError:
        return None


# -- ledger rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A document's ledger row: its row (None: not this shard's, or deleted) and version."""

    row: DocumentRow | None
    version: Version | None


NOTHING = Entry(None, None)  # a document the ledger has no row for


def ledger_row(key: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "kind": kind, "value": value, "placeholder": PLACEHOLDER}


def document_key(document_id: str) -> str:
    return f"d:{document_id}"


def offset_key(topic: str, partition: int) -> str:
    return "o:" + json.dumps([topic, partition], ensure_ascii=False)


def document_row(document_id: str, entry: Entry) -> dict[str, Any]:
    row = entry.row
    value = {
        "row": None if row is None else [row.content_hash, row.n_chunks, row.source],
        "version": entry.version,
    }
    return ledger_row(document_key(document_id), VERSION_ONLY if row is None else DOCUMENT, value)


def entry(value: Mapping[str, Any]) -> Entry:
    row, version = value.get("row"), value.get("version")
    document = None
    if row is not None:
        content_hash, n_chunks, source = row
        document = DocumentRow(content_hash, int(n_chunks), None if source is None else _version(source))
    return Entry(document, None if version is None else _version(version))


def offset_row(topic: str, partition: int, next_offset: int) -> dict[str, Any]:
    return ledger_row(
        offset_key(topic, partition), OFFSET, {"topic": topic, "partition": partition, "next": next_offset}
    )


def offsets(rows: Sequence[Mapping[str, Any]]) -> Offsets:
    """``{topic: {partition: next_offset}}`` from offset rows (their ``value``)."""
    result: Offsets = {}
    for row in rows:
        value = row["value"]
        result.setdefault(value["topic"], {})[int(value["partition"])] = int(value["next"])
    return result


def _version(value: Sequence[Any]) -> Version:
    topic, partition, offset = value
    return (str(topic), int(partition), int(offset))


def new_meta(model: str, dim: int, index_name: str, shard: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model,
        "dim": dim,
        "index": index_name,
        "shard": shard,
        "store_id": uuid.uuid4().hex,
    }


def check_meta(
    meta: Mapping[str, Any], model: str, dim: int, index_name: str, shard: int, where: str
) -> None:
    """:class:`ConfigError` when the store holds another model or dim, belongs to another index
    or shard, or has a newer layout."""
    if meta.get("model") != model or meta.get("dim") != dim:
        raise ConfigError(
            f"{where} holds model {meta.get('model')!r} (dim {meta.get('dim')}), "
            f"not model {model!r} (dim {dim}): a new model means a new index"
        )
    if meta.get("index") != index_name or meta.get("shard") != shard:
        raise ConfigError(
            f"{where} belongs to index {meta.get('index')!r} shard {meta.get('shard')}, not index "
            f"{index_name!r} shard {shard}: collection names collide (index.milvus.collection_prefix)"
        )
    if int(meta.get("format", 0)) > FORMAT:
        raise ConfigError(
            f"{where} has layout {meta.get('format')}, written by a newer riverbed; this one reads {FORMAT}"
        )


# -- expressions and batches ---------------------------------------------------------------


def expression(filter: MetadataFilter | None) -> str:
    return filter.to_milvus() if filter is not None and filter.conditions else ""


def id_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(milvus_literal(v) for v in values) + "]"


def batches(items: Sequence[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), BATCH):
        yield list(items[start : start + BATCH])


def sized_batches(
    items: Sequence[T], sizes: Sequence[int], max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[T]]:
    """``items`` in order, in batches of at most :data:`BATCH` items and ``max_bytes`` (an item
    larger than that alone)."""
    batch: list[T] = []
    total = 0
    for item, size in zip(items, sizes, strict=True):
        if batch and (len(batch) == BATCH or total + size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size
    if batch:
        yield batch
