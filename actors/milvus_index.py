"""MilvusIndex: one index shard kept in Milvus, embedded (Milvus Lite) or on a server.

Where: with ``MilvusConfig.uri`` unset, Milvus Lite runs inside this process on the data dir
``<shard dir>/milvus.db`` (node-local like FAISS; one process per data dir, Lite locks it). With a
uri, everything lives on the server and nothing on the node: the same shard opened on another
machine sees every chunk, document row, version and offset.

Each shard is two collections, ``<prefix>_<index>_<shard>_chunks`` and ``..._ledger`` (``-`` in the
index name becomes ``_``; no index part when the index is unnamed):

- chunks: one row per chunk (primary key ``chunk_id``) with its text, title, span, metadata (JSON),
  ``kinds`` (the kind of each metadata value, see :func:`schemas.filters.milvus_kinds`, so that
  filters keep Riverbed's semantics), alignment, its vector (inner product) and, for keyword
  search, BM25 vectors of its words that Milvus derives from ``text_words`` and ``title_words``;
- ledger: the store's identity (model, dim, ``store_id``), one row per document (its row and its
  version; a deleted document keeps its version) and one per Kafka partition (applied offsets).
  Milvus needs a vector field in every collection: the ledger's is a constant placeholder.

Writes and crashes. Milvus has no transactions, so :meth:`MilvusIndex.apply` is not atomic. It
reads the stored versions, then writes in this order: chunk deletions (truncations, deleted
documents, deleted chunks), chunk upserts, the ledger rows of documents (row and version
together, one row each), and the offsets LAST. Every step is idempotent, so a write interrupted at
any point (crash, server down) is completed by applying it again, and the stream does exactly
that: it re-delivers every record past the stored offsets. A failed ``apply`` raises and may leave
part of the write applied; the offsets never cover a write whose chunks and rows are not all
stored. Refusals known in advance (a wrong vector, a value too long for Milvus) are checked before
the first call and write nothing. Meanwhile a concurrent reader may see any prefix of that order:
a document's old chunks gone before its new ones arrive (or, within a batch of upserts, some new
and some old), new chunks before the document's row and version, everything before the offsets.

Visibility: reads use ``MilvusConfig.consistency_level`` (Strong by default), so a search after
``apply`` returns sees the write. Durability: a server's; Milvus Lite writes a WAL that survives a
process crash (fsynced at close). :meth:`MilvusIndex.snapshot` flushes (Lite searches unflushed
rows by brute force, and slowly), :meth:`MilvusIndex.restore` loads the collections.

Keyword search is Milvus's BM25 (k1 1.2, b 0.75, as SQLite FTS5) over words produced by the same
tokenizer as the FAISS store's FTS5 index (porter stemming, case and accent folding), so both
backends match the same words. Statistics are Milvus's: Milvus Lite keeps them per segment (and
for unflushed rows, among the rows the filter selects), so scores drift as segments come and go.

Errors: Milvus unreachable, overloaded or timing out (``MilvusConfig.timeout_s`` per call) raises
:class:`RetryableError` naming the shard and collection; bad input ``ValueError``
(:class:`ProcessingError` for a chunk Milvus cannot store); other refusals of Milvus propagate as
pymilvus raised them, with a note naming the shard and the call.

Thread safety: one lock serialises writes, snapshots and close; reads run on any thread (pymilvus
clients are thread-safe).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from actors.backends import StoredState, StoreUnreadableError
from actors.vector_index import (
    ChunkRecord,
    DocumentEntry,
    DocumentRow,
    Hit,
    ShardWrite,
    WriteConveniences,
    WriteResult,
    check_queries,
    check_records,
)
from schemas.errors import ConfigError, IndexUnavailableError, ProcessingError, RetryableError
from schemas.filters import MetadataFilter, milvus_kinds
from schemas.ids import split_chunk_id
from schemas.settings import MilvusConfig
from schemas.topology import Offsets, Version, is_older

__all__ = ["DB_NAME", "MilvusIndex", "collection_names", "stored_state"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DB_NAME = "milvus.db"  # Milvus Lite's data dir in the shard directory (Lite wants the .db suffix)
FORMAT = 1  # the layout of the collections; a newer one is refused
MAX_VARCHAR_BYTES = 65535  # Milvus's largest VARCHAR, counted in UTF-8 bytes
MAX_ID_BYTES = 4096  # chunk and document ids
MAX_JSON_BYTES = 65536  # Milvus's largest JSON value
MAX_TOP_K = 16384  # Milvus's largest search limit
BATCH = 256  # ids per ``in [...]`` expression
SCAN_BATCH = 4096  # rows per page of a query iterator
MAX_QUERY_WORDS = 64  # as the FAISS store's keyword search
BM25 = {"bm25_k1": 1.2, "bm25_b": 0.75}  # SQLite FTS5's constants
# The tokenizer of the FAISS store's FTS5 index (actors.store_schema): both backends index the same words.
FTS5_TOKENIZER = "porter unicode61 remove_diacritics 2"
_PLACEHOLDER = [1.0, 0.0]  # the ledger's vector: Milvus wants one per collection
_META, _DOCUMENT, _VERSION_ONLY, _OFFSET = "meta", "document", "version", "offset"
# The stored columns of a chunk, in ChunkRecord's order (what get and search read back).
_CHUNK_FIELDS = [
    "chunk_id", "document_id", "number", "text", "title", "span_start", "span_end", "metadata",
    "vector", "alignment",
]  # fmt: skip
_HIT_FIELDS = [f for f in _CHUNK_FIELDS if f != "vector"]
# gRPC codes of a call that may succeed later; codes 2 and 8 are Milvus's "cannot connect" and
# "rate limited" (pymilvus retries rate limits itself until its timeout).
_TRANSIENT_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
_TRANSIENT_CODES = {2, 8}
_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}  # Milvus Lite data dir -> open MilvusIndex objects in this process


def collection_names(config: MilvusConfig, index_name: str, shard: int) -> tuple[str, str]:
    """The names of shard ``shard``'s chunks and ledger collections."""
    base = "_".join(p for p in (config.collection_prefix, index_name.replace("-", "_")) if p)
    return f"{base}_{shard}_chunks", f"{base}_{shard}_ledger"


@dataclass(frozen=True)
class _Entry:
    """A document's ledger row: its row (None: not this shard's, or deleted) and version."""

    row: DocumentRow | None
    version: Version | None


_NOTHING = _Entry(None, None)  # a document the ledger has no row for


class MilvusIndex(WriteConveniences):
    """Shard ``shard`` of ``index_name`` in Milvus, implementing ``VectorIndex`` and
    ``KeywordSearch`` (see the module doc for layout, write order and errors).

    Opening creates the collections when absent and loads them. Raises :class:`ConfigError` when
    the store holds another model or dim (naming both) and :class:`RetryableError` when Milvus
    cannot be reached (or, embedded, another process holds the data dir).
    """

    def __init__(
        self, path: Path, model: str, dim: int, config: MilvusConfig, *, index_name: str = "", shard: int = 0
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.path = path
        self._config = config
        self._chunks, self._ledger = collection_names(config, index_name, shard)
        place = config.uri or str(path / DB_NAME)
        self._where = f"milvus shard {shard} ({self._chunks} at {place})"
        self._lock = threading.RLock()
        self._client: Any = None
        self._lite: str | None = None
        self._client, self._lite = _connect(path, config, self._where)
        try:
            meta = self._open_store(model, dim)
        except BaseException:
            self.close()
            raise
        self._model, self._dim, self._store_id = str(meta["model"]), int(meta["dim"]), str(meta["store_id"])

    @property
    def model(self) -> str:
        return self._model

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def store_id(self) -> str:
        """The store's identity, made when its ledger was created and kept in it."""
        return self._store_id

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Milvus has no per-shard quota: None is accepted, a number refused."""
        if max_bytes is not None:
            raise ConfigError(
                f"{self._where}: the milvus backend has no storage quota; unset index.max_shard_bytes"
            )

    # -- writes ---------------------------------------------------------------------------

    def apply(self, write: ShardWrite) -> WriteResult:
        """Applies ``write`` in :class:`ShardWrite`'s order, skipping the parts of documents whose
        version is older than the stored one. Not atomic, but every step is idempotent and the
        offsets are written last: see the module doc. Raises ``ValueError`` for a bad vector and
        :class:`ProcessingError` for a value Milvus cannot store (then nothing was written),
        :class:`RetryableError` when Milvus fails (then part of the write may be applied)."""
        records = write.unique_upserts()
        matrix = check_records(records, self._dim, self._where)
        rows = self._chunk_rows(records, matrix)
        for document_id in {**write.documents, **write.versions}:
            _check_id(document_id, f"{self._where}: document {document_id!r}")
        with self._lock:
            entries = self._entries([*write.versions, *write.documents, *write.delete_documents])
            stale = {d for d, v in write.versions.items() if is_older(v, entries.get(d, _NOTHING).version)}
            doomed = self._doomed(write, stale)
            self._delete(self._chunks, "chunk_id", sorted(doomed))
            live = [(r, row) for r, row in zip(records, rows, strict=True) if r.document_id not in stale]
            stored = self._stored([r.chunk_id for r, _ in live if r.chunk_id not in doomed])
            changed = [row for r, row in live if stored.get(r.chunk_id) != _content(r)]
            for batch in _batches(changed):
                self._call("upsert chunks", self._milvus().upsert, self._chunks, batch)
            self._write_entries(write, stale, entries)
            self._merge_offsets(write.offsets)
        return WriteResult(len(changed), len(live) - len(changed), len(doomed), stale=len(stale))

    # -- reads ----------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        """Top ``k`` (at most :data:`MAX_TOP_K`) by inner product per row of ``vectors``, best first."""
        queries = check_queries(vectors, self._dim, k, self._where)
        if len(queries) == 0:
            return []
        c = self._config
        params: dict[str, Any] = {}
        if c.index_type == "HNSW":  # an ef below k would return fewer than k hits
            params = {"ef": max(c.hnsw_ef_search, min(k, MAX_TOP_K))}
        elif c.index_type == "IVF_FLAT":
            params = {"nprobe": c.ivf_nprobe}
        results = self._read(
            "search",
            self._milvus().search,
            self._chunks,
            data=list(queries),
            anns_field="vector",
            limit=min(k, MAX_TOP_K),
            filter=_expression(filter),
            output_fields=_HIT_FIELDS,
            search_params={"metric_type": "IP", "params": params},
        )
        return [[_hit(h["entity"], float(h["distance"])) for h in hits] for hits in results]

    def keyword_search(
        self, queries: Sequence[str], k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[list[Hit]]:
        """Top ``k`` chunks per query string by BM25 over their text plus ``title_weight`` times
        BM25 over their title; ``score`` is that sum. Any word of the query may match (OR).

        Words are those the FAISS store's FTS5 index finds (stemmed, case- and accent-folded), at
        most :data:`MAX_QUERY_WORDS` distinct ones; no word: no hits. Unlike FTS5, which scores
        text and title as one document, each field has its own BM25, and with ``title_weight`` 0
        a match in the title alone is no hit. The sum is ranked exactly (each field's list is
        deepened until no chunk outside it can enter the top ``k``) up to :data:`MAX_TOP_K`
        chunks per field."""
        if title_weight < 0:
            raise ValueError(f"{self._where}: title_weight must be >= 0, got {title_weight}")
        expr = _expression(filter)
        out: list[list[Hit]] = []
        for words in _words(list(queries), distinct=True):
            if not words or k < 1:
                out.append([])
                continue
            ranked = self._fused(" ".join(words[:MAX_QUERY_WORDS]), k, expr, title_weight)
            found = {r["chunk_id"]: r for r in self._query_ids([cid for cid, _ in ranked], _HIT_FIELDS)}
            out.append([_hit(found[cid], score) for cid, score in ranked if cid in found])
        return out

    def metadata_fields(self) -> set[str]:
        """Every metadata key some chunk has. Scans every chunk's ``kinds`` (Milvus keeps no
        catalogue of JSON keys): O(chunks), so callers cache it."""
        fields: set[str] = set()
        for row in self._scan(self._chunks, "", ["kinds"]):
            fields.update(row["kinds"])
        return fields

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        found = {r["chunk_id"]: _record(r) for r in self._query_ids(list(chunk_ids), _CHUNK_FIELDS)}
        return [found.get(c) for c in chunk_ids]

    def count(self) -> int:
        """Live chunks: Milvus's ``count(*)`` (exact; O(chunks) in Milvus Lite)."""
        return self._count(self._chunks, "")

    def vector_count(self) -> int:
        """Live vectors: the chunks themselves, since Milvus keeps each vector in its chunk's row
        (there is no separate structure to drift), so this equals :meth:`count`."""
        return self.count()

    def document_count(self) -> int:
        """Document rows (the documents whose registry shard this is)."""
        return self._count(self._ledger, f'kind == "{_DOCUMENT}"')

    def document_ids(self) -> set[str]:
        """Ids of the documents with a chunk here; scans every chunk (tools and tests only)."""
        return {r["document_id"] for r in self._scan(self._chunks, "", ["document_id"])}

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(document_ids, 0)
        for batch in _batches(list(counts)):
            for row in self._scan(self._chunks, f"document_id in {_list(batch)}", ["document_id"]):
                counts[row["document_id"]] += 1
        return counts

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        entries = self._entries(document_ids)
        return {d: e.row for d, e in entries.items() if e.row is not None}

    def get_document_hashes(self, document_ids: Sequence[str]) -> dict[str, str]:
        return {d: row.content_hash for d, row in self.get_document_rows(document_ids).items()}

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        entries = self._entries(document_ids)
        return {d: e.version for d, e in entries.items() if e.version is not None}

    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]:
        """At most ``limit`` chunks with ids after ``after``, by ascending id."""
        rows = self._scan(self._chunks, "", _CHUNK_FIELDS, limit, after=after)
        return sorted((_record(r) for r in rows), key=lambda r: r.chunk_id)

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        """At most ``limit`` ledger documents with ids after ``after``, by ascending id."""
        expr = f'kind in ["{_DOCUMENT}", "{_VERSION_ONLY}"]'
        rows = self._scan(self._ledger, expr, ["key", "value"], limit, after=_document_key(after))
        entries = sorted((r["key"][2:], _entry(r["value"])) for r in rows)
        return [DocumentEntry(d, e.row, e.version) for d, e in entries]

    def offsets(self) -> Offsets:
        """``{topic: {partition: next_offset}}`` covered by completed writes."""
        result: Offsets = {}
        for row in self._scan(self._ledger, f'kind == "{_OFFSET}"', ["value"]):
            value = row["value"]
            result.setdefault(value["topic"], {})[int(value["partition"])] = int(value["next"])
        return result

    # -- persistence ----------------------------------------------------------------------

    def snapshot(self) -> None:
        """Flushes both collections: sealed segments with built indexes (Milvus Lite searches
        unflushed rows by brute force) and, in Lite, a fsynced manifest."""
        with self._lock:
            for name in (self._chunks, self._ledger):
                self._call(f"flush {name}", self._milvus().flush, name)

    def restore(self) -> None:
        """Loads both collections (needed after a restart; a no-op when loaded)."""
        with self._lock:
            for name in (self._chunks, self._ledger):
                self._call(f"load {name}", self._milvus().load_collection, name)

    def close(self) -> None:
        """Closes the client and, for Milvus Lite, stops its server once no object of this process
        uses the data dir (releasing it for other processes). Idempotent; nothing is flushed."""
        with self._lock:
            client, self._client = self._client, None
            lite, self._lite = self._lite, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a client whose server is gone
                client.close()
        if lite is not None:
            _release_lite(lite)

    # -- opening --------------------------------------------------------------------------

    def _open_store(self, model: str, dim: int) -> dict[str, Any]:
        """Creates what is missing (chunks, then ledger, then the meta row: a crash in between
        leaves a store that the next open completes), checks model and dim, loads."""
        client = self._milvus()
        meta = self._meta() if self._call("has_collection", client.has_collection, self._ledger) else None
        if meta is not None:
            _check_meta(meta, model, dim, self._where)
            if not self._call("has_collection", client.has_collection, self._chunks):
                raise IndexUnavailableError(
                    f"{self._where}: the ledger exists but its chunks collection is gone"
                )
            self._follow_index_config()
            self.restore()
            return meta
        if not self._call("has_collection", client.has_collection, self._chunks):
            self._create_chunks(dim)
        if not self._call("has_collection", client.has_collection, self._ledger):
            self._create_ledger()
        self.restore()
        meta = {"format": FORMAT, "model": model, "dim": dim, "store_id": uuid.uuid4().hex}
        self._put_ledger([_ledger_row("meta", _META, meta)])
        log.info("%s: created (store %s)", self._where, meta["store_id"])
        return meta

    def _meta(self) -> dict[str, Any] | None:
        self._call("load ledger", self._milvus().load_collection, self._ledger)
        rows = self._query_keys(["meta"])
        return dict(rows[0]["value"]) if rows else None

    def _create_chunks(self, dim: int) -> None:
        from pymilvus import DataType, Function, FunctionType

        client, c = self._milvus(), self._config
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
        for field in ("text", "title"):  # words already tokenized: the standard tokenizer only splits
            schema.add_field(
                f"{field}_words", DataType.VARCHAR, max_length=MAX_VARCHAR_BYTES, enable_analyzer=True
            )
            schema.add_field(f"{field}_bm25", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(f"{field}_bm25", FunctionType.BM25, [f"{field}_words"], [f"{field}_bm25"])
            )
        self._call(
            f"create {self._chunks}",
            client.create_collection,
            self._chunks,
            schema=schema,
            consistency_level=c.consistency_level,
        )
        self._index(self._chunks, "vector", c.index_type, "IP", _vector_build(c))
        for field in ("text_bm25", "title_bm25"):
            self._index(self._chunks, field, "SPARSE_INVERTED_INDEX", "BM25", BM25)

    def _follow_index_config(self) -> None:
        """Rebuilds the vector index when it was built with another type or parameters than the
        config now asks for (released meanwhile: Milvus drops an index only then)."""
        client, c = self._milvus(), self._config
        info = self._call("describe index", client.describe_index, self._chunks, "vector")
        build = _vector_build(c)
        params = {**info, **(info.get("params") or {})}  # a server answers them flat, Lite nested
        if str(info.get("index_type")) == c.index_type and all(
            str(params.get(k)) == str(v) for k, v in build.items()
        ):
            return
        log.warning(
            "%s: rebuilding the vector index as %s %s (it was %s)", self._where, c.index_type, build, info
        )
        self._call("release", client.release_collection, self._chunks)
        self._call("drop index", client.drop_index, self._chunks, "vector")
        self._index(self._chunks, "vector", c.index_type, "IP", build)

    def _create_ledger(self) -> None:
        from pymilvus import DataType

        client = self._milvus()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=2 * MAX_ID_BYTES)
        schema.add_field("kind", DataType.VARCHAR, max_length=16)
        schema.add_field("value", DataType.JSON)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=len(_PLACEHOLDER))
        self._call(
            f"create {self._ledger}",
            client.create_collection,
            self._ledger,
            schema=schema,
            consistency_level=self._config.consistency_level,
        )
        self._index(self._ledger, "placeholder", "FLAT", "IP", {})

    def _index(
        self, collection: str, field: str, index_type: str, metric: str, build: dict[str, Any]
    ) -> None:
        """Creates the index of ``field`` without waiting for it to be built (a new collection is
        empty; pymilvus would poll every 0.5 s). Through the client's connection rather than
        ``MilvusClient.create_index``, which (pymilvus 3.0.2) sends build parameters only as
        top-level keys: Milvus servers read those, Milvus Lite 3.2.2 reads a ``params`` key alone
        and silently builds with its defaults. Both forms are sent."""
        params = {"index_type": index_type, "metric_type": metric, **build} | (
            {"params": build} if build else {}
        )
        connection = self._milvus()._get_connection()
        self._call(
            f"index {collection}.{field}",
            connection.create_index,
            collection,
            field,
            params,
            index_name=field,
            sync=False,
        )

    # -- write steps ----------------------------------------------------------------------

    def _chunk_rows(self, records: Sequence[ChunkRecord], matrix: np.ndarray) -> list[dict[str, Any]]:
        """The Milvus rows of ``records``; :class:`ProcessingError` naming the first chunk with a
        value Milvus cannot store (checked before anything is written)."""
        text_words = _words([r.text for r in records])
        title_words = _words([r.title or "" for r in records])
        rows = []
        for i, r in enumerate(records):
            row = {
                "chunk_id": r.chunk_id,
                "document_id": r.document_id,
                "number": r.number,
                "text": r.text,
                "title": r.title,
                "span_start": r.start,
                "span_end": r.end,
                "metadata": dict(r.metadata),
                "kinds": milvus_kinds(r.metadata),
                "alignment": r.alignment,
                "vector": matrix[i],
                "text_words": " ".join(text_words[i]),
                "title_words": " ".join(title_words[i]),
            }
            _check_row(row, f"{self._where}: chunk {r.chunk_id!r}")
            rows.append(row)
        return rows

    def _doomed(self, write: ShardWrite, stale: set[str]) -> set[str]:
        """The stored chunk ids that the write's truncations and deletions remove (one query per
        batch of documents: every versioned update truncates its document)."""
        keep = {d: n for d, n in write.truncate.items() if d not in stale}
        keep.update(dict.fromkeys((d for d in write.delete_documents if d not in stale), 0))
        doomed: set[str] = set()
        for batch in _batches(list(keep)):
            expr = f"document_id in {_list(batch)}"
            for row in self._scan(self._chunks, expr, ["document_id", "number"]):
                if row["number"] >= keep[row["document_id"]]:
                    doomed.add(row["chunk_id"])
        wanted = [c for c in write.delete_chunks if _document_of(c) not in stale]
        doomed.update(r["chunk_id"] for r in self._query_ids(wanted, ["chunk_id"]))
        return doomed

    def _stored(self, chunk_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """The stored content of those of ``chunk_ids`` that exist (see :func:`_content`)."""
        return {r["chunk_id"]: _content(_record(r)) for r in self._query_ids(chunk_ids, _CHUNK_FIELDS)}

    def _write_entries(self, write: ShardWrite, stale: set[str], entries: dict[str, _Entry]) -> None:
        """Sets the ledger row of every document whose row or version the write changes, in
        :class:`ShardWrite`'s order (a deletion, then a new row, then the version)."""
        changed: dict[str, _Entry] = {}

        def now(document_id: str) -> _Entry:
            return changed.get(document_id, entries.get(document_id, _NOTHING))

        for d in (d for d in write.delete_documents if d not in stale):
            changed[d] = _Entry(None, now(d).version)
        for d, row in write.documents.items():
            if d not in stale:
                changed[d] = _Entry(row, now(d).version)
        for d, version in write.versions.items():
            if d not in stale:
                changed[d] = _Entry(now(d).row, version)
        changed = {d: e for d, e in changed.items() if e != entries.get(d, _NOTHING)}
        self._put_ledger([_document_row(d, e) for d, e in changed.items() if e != _NOTHING])
        self._delete(self._ledger, "key", [_document_key(d) for d, e in changed.items() if e == _NOTHING])

    def _merge_offsets(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Raises each stored offset to the write's when the write's is higher."""
        wanted = {
            _offset_key(t, int(p)): (t, int(p), int(o)) for t, ps in offsets.items() for p, o in ps.items()
        }
        stored = {r["key"]: int(r["value"]["next"]) for r in self._query_keys(list(wanted))}
        rows = [
            _ledger_row(key, _OFFSET, {"topic": t, "partition": p, "next": o})
            for key, (t, p, o) in wanted.items()
            if o > stored.get(key, -1)
        ]
        self._put_ledger(rows)

    def _put_ledger(self, rows: list[dict[str, Any]]) -> None:
        for batch in _batches(rows):
            self._call("upsert ledger", self._milvus().upsert, self._ledger, batch)

    def _delete(self, collection: str, key: str, ids: list[str]) -> None:
        for batch in _batches(ids):
            self._call(
                f"delete from {collection}",
                self._milvus().delete,
                collection,
                filter=f"{key} in {_list(batch)}",
            )

    # -- read steps -----------------------------------------------------------------------

    def _entries(self, document_ids: Iterable[str]) -> dict[str, _Entry]:
        keys = [_document_key(d) for d in dict.fromkeys(document_ids)]
        return {r["key"][2:]: _entry(r["value"]) for r in self._query_keys(keys)}

    def _query_keys(self, keys: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in _batches(keys):
            expr = f"key in {_list(batch)}"
            rows += self._read(
                "query ledger",
                self._milvus().query,
                self._ledger,
                filter=expr,
                output_fields=["key", "value"],
            )
        return rows

    def _query_ids(self, chunk_ids: list[str], fields: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in _batches(list(dict.fromkeys(chunk_ids))):
            expr = f"chunk_id in {_list(batch)}"
            rows += self._read(
                "query chunks", self._milvus().query, self._chunks, filter=expr, output_fields=fields
            )
        return rows

    def _count(self, collection: str, expr: str) -> int:
        rows = self._read(
            f"count {collection}", self._milvus().query, collection, filter=expr, output_fields=["count(*)"]
        )
        return int(rows[0]["count(*)"])

    def _scan(
        self,
        collection: str,
        expr: str,
        fields: list[str],
        limit: int | None = None,
        after: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every row matching ``expr`` (at most ``limit``, primary keys above ``after``), read page
        by page in primary-key order. pymilvus's own query iterator writes the last key of a page
        into the next page's expression unescaped (a key holding ``"`` breaks it), so this one
        pages itself, with the same ``iterator`` hint that makes Milvus answer in key order."""
        pk = "chunk_id" if collection == self._chunks else "key"
        while limit is None or limit > 0:
            size = SCAN_BATCH if limit is None else min(limit, SCAN_BATCH)
            parts = ([] if after is None else [f"{pk} > {_literal(after)}"]) + ([f"({expr})"] if expr else [])
            page = self._read(
                f"scan {collection}",
                self._milvus().query,
                collection,
                filter=" and ".join(parts),
                output_fields=list(dict.fromkeys([pk, *fields])),
                limit=size,
                iterator="True",
            )
            page.sort(key=lambda row: row[pk])
            yield from page
            if len(page) < size:
                return
            after, limit = page[-1][pk], None if limit is None else limit - len(page)

    def _fused(self, words: str, k: int, expr: str, title_weight: float) -> list[tuple[str, float]]:
        """The top ``k`` ``(chunk_id, text BM25 + title_weight * title BM25)``, best first (ties by
        id), each field's list deepened until the sum is exact (see :func:`_fuse`)."""
        fields = [("text_bm25", 1.0)] + ([("title_bm25", title_weight)] if title_weight > 0 else [])
        limit = min(max(4 * k, 64), MAX_TOP_K)
        while True:
            lists = [self._bm25(field, words, limit, expr) for field, _ in fields]
            ranked, exact = _fuse(lists, [w for _, w in fields], k, limit)
            if exact or limit >= MAX_TOP_K:
                return ranked
            limit = min(4 * limit, MAX_TOP_K)

    def _bm25(self, field: str, words: str, limit: int, expr: str) -> list[tuple[str, float]]:
        [hits] = self._read(
            "keyword search",
            self._milvus().search,
            self._chunks,
            data=[words],
            anns_field=field,
            limit=limit,
            filter=expr,
            output_fields=[],
            search_params={"metric_type": "BM25"},
        )
        # Milvus Lite answers -score, a server +score: BM25 of a match is always positive
        return [(h["chunk_id"], abs(float(h["distance"]))) for h in hits]

    # -- calls ----------------------------------------------------------------------------

    def _milvus(self) -> Any:
        client = self._client
        if client is None:
            raise IndexUnavailableError(f"{self._where} is closed")
        return client

    def _read(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._call(what, fn, *args, consistency_level=self._config.consistency_level, **kwargs)

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` within ``timeout_s`` (see :meth:`_calling` for its errors)."""
        with self._calling(what):
            return fn(*args, timeout=self._config.timeout_s, **kwargs)

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Raises a failure that may pass (Milvus unreachable, overloaded, timing out) as
        :class:`RetryableError`; notes the shard and the call on any other."""
        try:
            yield
        except Exception as exc:
            if _is_transient(exc):
                raise RetryableError(f"{self._where}: {what} failed: {exc}") from exc
            exc.add_note(f"{self._where}: {what}")
            raise


def stored_state(path: Path, config: MilvusConfig, *, index_name: str, shard: int) -> StoredState | None:
    """What shard ``shard``'s store holds, or None when it has none yet; creates nothing. Raises
    :class:`StoreUnreadableError` when it cannot be read (server down; embedded: the data dir
    open in another process)."""
    if config.uri is None and not (path / DB_NAME).exists():
        return None
    chunks, ledger = collection_names(config, index_name, shard)
    where = f"milvus shard {shard} ({chunks} at {config.uri or path / DB_NAME})"
    try:
        client, lite = _connect(path, config, where)
    except RetryableError as exc:
        raise StoreUnreadableError(str(exc)) from exc
    try:
        timeout = config.timeout_s
        if not client.has_collection(ledger, timeout=timeout) or not client.has_collection(
            chunks, timeout=timeout
        ):
            return None
        for name in (ledger, chunks):  # a server keeps a collection loaded for the shards
            client.load_collection(name, timeout=timeout)
        read = {"timeout": timeout, "consistency_level": config.consistency_level}
        meta = client.query(ledger, filter='key in ["meta"]', output_fields=["value"], **read)
        if not meta:
            return None
        applied: Offsets = {}
        for row in client.query(ledger, filter=f'kind == "{_OFFSET}"', output_fields=["value"], **read):
            value = row["value"]
            applied.setdefault(value["topic"], {})[int(value["partition"])] = int(value["next"])
        [n_chunks] = client.query(chunks, filter="", output_fields=["count(*)"], **read)
        [n_docs] = client.query(ledger, filter=f'kind == "{_DOCUMENT}"', output_fields=["count(*)"], **read)
        value = meta[0]["value"]
        return StoredState(
            str(value["model"]),
            int(value["dim"]),
            applied,
            True,
            int(n_chunks["count(*)"]),
            int(n_docs["count(*)"]),
        )
    except Exception as exc:
        raise StoreUnreadableError(f"{where}: cannot read the store: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if lite is not None:
            _release_lite(lite)


# -- connections ---------------------------------------------------------------------------


def _connect(path: Path, config: MilvusConfig, where: str) -> tuple[Any, str | None]:
    """A client for ``config`` and, when embedded, the Lite data dir it holds (released by
    :func:`_release_lite`). :class:`RetryableError` when Milvus cannot be reached (embedded: the
    data dir is held by another process, or damaged); :class:`ConfigError` for a malformed uri."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs every failed call itself
    data_dir = None
    if config.uri is None:
        path.mkdir(parents=True, exist_ok=True)
        data_dir = str((path / DB_NAME).absolute())
        with _lite_lock:
            _lite_users[data_dir] = _lite_users.get(data_dir, 0) + 1
    try:
        if data_dir is not None:
            return MilvusClient(data_dir, timeout=config.timeout_s), data_dir
        token = config.token.get_secret_value() if config.token is not None else ""
        client = MilvusClient(uri=config.uri, token=token, db_name=config.db_name, timeout=config.timeout_s)
        return client, None
    except BaseException as exc:
        if data_dir is not None:
            _release_lite(data_dir)
        if isinstance(exc, ConnectionConfigException) and data_dir is not None:  # Lite did not start
            raise RetryableError(
                f"{where}: Milvus Lite cannot open {data_dir}: another process holds it (one process "
                f"per data dir) or it is damaged (the milvus_lite log says which): {exc}"
            ) from exc
        if isinstance(exc, ConnectionConfigException):
            raise ConfigError(f"{where}: index.milvus.uri: {exc}") from exc
        if isinstance(exc, Exception) and _is_transient(exc):
            raise RetryableError(f"{where}: cannot connect: {exc}") from exc
        exc.add_note(f"{where}: connecting")
        raise


def _release_lite(data_dir: str) -> None:
    """Forgets one user of ``data_dir``; the last one stops its Milvus Lite server (which closes
    the data dir: fsyncs its WAL and unlocks it)."""
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        users = _lite_users.get(data_dir, 0) - 1
        if users > 0:
            _lite_users[data_dir] = users
            return
        _lite_users.pop(data_dir, None)
        server_manager_instance.release_server(data_dir)


def _vector_build(config: MilvusConfig) -> dict[str, Any]:
    """The build parameters of the vector index ``config`` asks for."""
    if config.index_type == "HNSW":
        return {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
    if config.index_type == "IVF_FLAT":
        return {"nlist": config.ivf_nlist}
    return {}


def _is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (from pymilvus) says Milvus cannot answer now rather than refusing the call."""
    import grpc
    from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:  # pymilvus raises some errors "from" themselves
        chain.append(seen)
        if isinstance(seen, grpc.RpcError) and seen.code().name in _TRANSIENT_GRPC:
            return True
        if isinstance(seen, ConnectError | MilvusUnavailableException | TimeoutError | ConnectionError):
            return True
        if isinstance(seen, MilvusException):
            message = str(seen.message)
            if seen.code in _TRANSIENT_CODES or "Retry timeout" in message or "Retry run out" in message:
                return True
        seen = seen.__cause__
    return False


# -- rows and expressions ------------------------------------------------------------------


def _words(texts: list[str], distinct: bool = False) -> list[list[str]]:
    """The words of each text as the FAISS store's FTS5 index finds them, in order (each once when
    ``distinct``): SQLite's own tokenizer, run on an in-memory FTS5 table."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{FTS5_TOKENIZER}')")
        conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        conn.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)", enumerate(texts))
        words: list[list[str]] = [[] for _ in texts]
        for doc, term in conn.execute("SELECT doc, term FROM v ORDER BY doc, offset"):
            words[doc].append(term)
    return [list(dict.fromkeys(w)) for w in words] if distinct else words


def _check_row(row: Mapping[str, Any], where: str) -> None:
    if len(row["chunk_id"].encode()) > MAX_ID_BYTES:
        raise ProcessingError(f"{where}: the id is over {MAX_ID_BYTES} bytes, the most Milvus stores here")
    for field in ("text", "title", "alignment", "text_words", "title_words"):
        size = len((row[field] or "").encode())
        if size > MAX_VARCHAR_BYTES:
            raise ProcessingError(
                f"{where}: {field} is {size} bytes in UTF-8, over the {MAX_VARCHAR_BYTES} Milvus stores"
            )
    size = len(json.dumps(row["metadata"], ensure_ascii=False).encode())
    if size > MAX_JSON_BYTES:
        raise ProcessingError(f"{where}: metadata is {size} bytes as JSON, over Milvus's {MAX_JSON_BYTES}")


def _check_id(document_id: str, where: str) -> None:
    if len(document_id.encode()) > MAX_ID_BYTES:
        raise ProcessingError(f"{where}: the id is over {MAX_ID_BYTES} bytes, the most Milvus stores here")


def _content(record: ChunkRecord) -> tuple[Any, ...]:
    """What makes two stored chunks the same: every field, metadata as canonical JSON (so that
    ``true`` and ``1`` differ, as they do for filters) and the vector's bytes."""
    metadata = json.dumps(record.metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return (*record.without_vector()[:7], metadata, record.alignment, record.vector.tobytes())


def _record(row: Mapping[str, Any]) -> ChunkRecord:
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


def _hit(row: Mapping[str, Any], score: float) -> Hit:
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


def _fuse(
    lists: list[list[tuple[str, float]]], weights: list[float], k: int, limit: int
) -> tuple[list[tuple[str, float]], bool]:
    """The top ``k`` by the weighted sum of per-field scores, from each field's best ``limit``
    ``(id, score)``, and whether it is exact: a chunk missing from a full list may score up to
    that list's last score there, so the ranking is exact when every chunk of the top ``k`` is
    known in every list and no other chunk can reach the ``k``-th score."""
    bounds = [scores[-1][1] if len(scores) >= limit else 0.0 for scores in lists]
    known: dict[str, list[float | None]] = {}
    for i, scores in enumerate(lists):
        for cid, score in scores:
            known.setdefault(cid, [None] * len(lists))[i] = score
    low = {c: sum(w * (s or 0.0) for w, s in zip(weights, ss, strict=True)) for c, ss in known.items()}
    high = {
        c: sum(w * (b if s is None else s) for w, s, b in zip(weights, ss, bounds, strict=True))
        for c, ss in known.items()
    }
    top = sorted(known, key=lambda c: (-low[c], c))[:k]
    rest = max(
        [high[c] for c in known.keys() - set(top)]
        + [sum(w * b for w, b in zip(weights, bounds, strict=True))]
    )
    floor = low[top[-1]] if len(top) == k else 0.0
    exact = all(low[c] == high[c] for c in top) and rest <= floor
    return [(c, low[c]) for c in top], exact


def _expression(filter: MetadataFilter | None) -> str:
    return filter.to_milvus() if filter is not None and filter.conditions else ""


def _literal(value: str) -> str:
    """``value`` as a Milvus string literal (escapes as :meth:`MetadataFilter.to_milvus` does)."""
    return '"' + value.translate(_ESCAPES) + '"'


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_literal(v) for v in values) + "]"


def _batches(items: Sequence[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), BATCH):
        yield list(items[start : start + BATCH])


def _document_key(document_id: str) -> str:
    return f"d:{document_id}"


def _offset_key(topic: str, partition: int) -> str:
    return "o:" + json.dumps([topic, partition], ensure_ascii=False)


def _ledger_row(key: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "kind": kind, "value": value, "placeholder": _PLACEHOLDER}


def _document_row(document_id: str, entry: _Entry) -> dict[str, Any]:
    row = entry.row
    value = {
        "row": None if row is None else [row.content_hash, row.n_chunks, row.source],
        "version": entry.version,
    }
    return _ledger_row(_document_key(document_id), _VERSION_ONLY if row is None else _DOCUMENT, value)


def _entry(value: Mapping[str, Any]) -> _Entry:
    row, version = value.get("row"), value.get("version")
    document = None
    if row is not None:
        content_hash, n_chunks, source = row
        document = DocumentRow(content_hash, int(n_chunks), None if source is None else _version(source))
    return _Entry(document, None if version is None else _version(version))


def _version(value: Sequence[Any]) -> Version:
    topic, partition, offset = value
    return (str(topic), int(partition), int(offset))


def _document_of(chunk_id: str) -> str | None:
    try:
        return split_chunk_id(chunk_id)[0]
    except ValueError:
        return None


def _check_meta(meta: Mapping[str, Any], model: str, dim: int, where: str) -> None:
    if meta.get("model") != model or meta.get("dim") != dim:
        raise ConfigError(
            f"{where} holds model {meta.get('model')!r} (dim {meta.get('dim')}), "
            f"not model {model!r} (dim {dim}): a new model means a new index"
        )
    if int(meta.get("format", 0)) > FORMAT:
        raise ConfigError(
            f"{where} has layout {meta.get('format')}, written by a newer riverbed; this one reads {FORMAT}"
        )
