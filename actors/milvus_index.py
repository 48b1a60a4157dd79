"""MilvusIndex: one index shard kept in Milvus, embedded (Milvus Lite) or on a server.

Where: with ``MilvusConfig.uri`` unset, Milvus Lite runs inside this process on the data dir
``<shard dir>/milvus.db`` (node-local like FAISS; one process per data dir, Lite locks it). With a
uri, everything lives on the server (in ``MilvusConfig.db_name``) and nothing on the node: the
same shard opened on another machine sees every chunk, document row, version and offset.

Each shard is two collections (names and rows: :mod:`actors.milvus_layout`):

- chunks: one row per chunk (primary key ``chunk_id``) with its text, title, span, metadata (JSON),
  ``kinds`` (the kind of each metadata value, see :func:`schemas.filters.milvus_kinds`, so that
  filters keep Riverbed's semantics), alignment, its vector (inner product) and, for keyword
  search, BM25 vectors of its words that Milvus derives from ``text_words`` and ``title_words``;
- ledger: the store's identity (model, dim, index, shard, ``store_id``), its current writer, one
  row per document (its row and its version; a deleted document keeps its version) and one per
  Kafka partition (applied offsets). Milvus needs a vector field in every collection: the
  ledger's is a constant placeholder.

Opening completes what an opening cut off left undone (a missing collection, index or meta row),
rebuilds the vector index when the config asks for another, and loads both collections.

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

One writer. Opening a store claims it (a new ``owner`` row); ``apply`` checks the claim before
the chunk step, the ledger step and the offsets step, and a writer that lost it raises
:class:`IndexUnavailableError` and writes nothing more. This stops a shard cut off from the
stream (its actor replaced, say, on another node) from writing on after its replacement opened
the store, except for a step already past its check when the replacement opened: Milvus has no
conditional write, so two writers are not excluded, only made unlikely and short-lived. The
counts below assume one writer.

Visibility: the reads a write decides by (versions, chunks to remove, stored offsets) and
:func:`stored_state` are Strong, whatever the config says; searches and other reads use
``MilvusConfig.consistency_level`` (Strong by default: a search after ``apply`` returns sees the
write).

Durability. A server: what it acknowledged is in its log. Milvus Lite: its log reaches the OS on
each call but is fsynced only when retired, and its segments are written without fsync (not
configurable in Lite 3.2). So ``apply`` fsyncs the files Lite changed (:class:`LiteFiles`) before
writing the offsets (chunks and rows) and before returning (the offsets): a write is durable when
``apply`` returns, and the offsets never cover lost chunks. Lite's own flushes (when its memory
table or log is full, on :meth:`MilvusIndex.snapshot`, on close) and its background compactions
rewrite rows into new segments and drop the old files: until this shard's next write, snapshot
or close fsyncs them (or the OS writes them back, within about 30 s), an OS crash or power loss
can lose rows written before. A process crash loses nothing.

Counts: :meth:`MilvusIndex.count`, :meth:`MilvusIndex.document_count` and
:meth:`MilvusIndex.offsets` are kept in this object, counted at open and moved by each ``apply``
(O(1)); after a failed ``apply`` they are counted again (O(chunks)) when next read.

Keyword search is Milvus's BM25 (k1 1.2, b 0.75, as SQLite FTS5) over words produced by the same
tokenizer as the FAISS store's FTS5 index (:mod:`actors.milvus_words`), so both backends match the
same words. Statistics are Milvus's: Milvus Lite keeps them per segment (and for unflushed rows,
among the rows the filter selects), so scores drift as segments come and go.

Errors (each call within ``MilvusConfig.timeout_s``; messages name the shard and collection, see
:func:`actors.milvus_client.error_class`): :class:`RetryableError` when Milvus is unreachable,
timing out, not ready, overloaded, rate limited or loading; :class:`StorageFullError` when it
refuses writes for memory, disk or quota; ``ValueError`` for a bad vector or query;
:class:`ProcessingError` for a chunk Milvus cannot store (a value over its limits, a request it
calls an input error, a message over its gRPC size limit); :class:`IndexUnavailableError` for a
closed shard or one whose store another writer opened since; other refusals of Milvus
propagate as pymilvus raised them, with a note naming the shard and the call.

Thread safety: one lock serialises writes, snapshots and close; reads run on any thread (pymilvus
clients are thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from actors.backends import StoredState, StoreUnreadableError
from actors.milvus_client import LiteFiles, connect, error_class, is_milvus_lite, milvus_code, release_lite
from actors.milvus_layout import (
    CHUNK_FIELDS,
    DB_NAME,
    DOCUMENT,
    HIT_FIELDS,
    LEDGER_INDEXES,
    MAX_TOP_K,
    META,
    NOTHING,
    OFFSET,
    OWNER,
    SCAN_BATCH,
    VERSION_ONLY,
    Entry,
    IndexSpec,
    batches,
    check_id,
    check_meta,
    chunk_indexes,
    chunk_row,
    chunks_schema,
    collection_names,
    content,
    document_key,
    document_of,
    document_row,
    entry,
    expression,
    hit,
    id_list,
    ledger_row,
    ledger_schema,
    new_meta,
    offset_key,
    offset_row,
    offsets,
    record,
    search_params,
    sized_batches,
    vector_dim,
)
from actors.milvus_words import MAX_QUERY_WORDS, analyzer, fuse, words
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
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError
from schemas.filters import MetadataFilter, milvus_literal
from schemas.settings import MilvusConfig
from schemas.topology import Offsets, Version, is_older

__all__ = ["DB_NAME", "MilvusIndex", "collection_names", "stored_state"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_OFFSETS = f'kind == "{OFFSET}"'
_DOCUMENTS = f'kind == "{DOCUMENT}"'
_NOT_LOADED = 101  # Milvus's "collection not loaded"


@dataclass(frozen=True)
class _Counts:
    chunks: int
    documents: int


class MilvusIndex(WriteConveniences):
    """Shard ``shard`` of ``index_name`` in Milvus, implementing ``VectorIndex`` and
    ``KeywordSearch`` (see the module doc for layout, write order, durability and errors).

    Opening creates the collections when absent, completes an interrupted creation, claims the
    store for this writer and loads it. Raises :class:`ConfigError` when the store holds another
    model or dim, or belongs to another index or shard (naming both), and
    :class:`RetryableError` when Milvus cannot be reached (or, embedded, another process holds
    the data dir).
    """

    def __init__(
        self, path: Path, model: str, dim: int, config: MilvusConfig, *, index_name: str = "", shard: int = 0
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.path = path
        self._config = config
        self._index_name, self._shard = index_name, shard
        self._chunks, self._ledger = collection_names(config, index_name, shard)
        place = config.uri or str(path / DB_NAME)
        self._where = f"milvus shard {shard} ({self._chunks} at {place})"
        self._lock = threading.RLock()
        self._client: Any = None
        self._lite: str | None = None
        self._files: LiteFiles | None = None  # Milvus Lite's files, fsynced by this object
        self._owner = uuid.uuid4().hex
        self._counts: _Counts | None = None  # None: to count again
        self._offsets: Offsets | None = None  # None: to read again
        self._client, self._lite = connect(path, config, self._where)
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
        offsets are written last; durable on return: see the module doc. Raises ``ValueError``
        for a bad vector and :class:`ProcessingError` for a value Milvus cannot store in a chunk
        it would write (then nothing was written), :class:`RetryableError` when Milvus fails and
        :class:`IndexUnavailableError` when another writer opened the store since this one (then
        part of the write may be applied)."""
        records = write.unique_upserts()
        matrix = check_records(records, self._dim, self._where)
        for document_id in {**write.documents, **write.versions}:
            check_id(document_id, f"{self._where}: document {document_id!r}")
        with self._lock:
            entries = self._entries([*write.versions, *write.documents, *write.delete_documents], strong=True)
            stale = {d for d, v in write.versions.items() if is_older(v, entries.get(d, NOTHING).version)}
            live = [i for i, r in enumerate(records) if r.document_id not in stale]
            rows = self._chunk_rows([records[i] for i in live], matrix[live])
            doomed = self._doomed(write, stale)
            stored = self._stored([records[i].chunk_id for i in live if records[i].chunk_id not in doomed])
            changed = [
                rs
                for i, rs in zip(live, rows, strict=True)
                if stored.get(records[i].chunk_id) != content(records[i])
            ]
            added = sum(1 for i in live if records[i].chunk_id not in stored)
            try:
                documents, merged = self._write(write, stale, entries, doomed, changed)
            except BaseException:
                self._counts = self._offsets = None  # part of the write may be stored: read them again
                raise
            if (counts := self._counts) is not None:
                self._counts = _Counts(counts.chunks + added - len(doomed), counts.documents + documents)
            if (applied := self._offsets) is not None:
                self._offsets = _merged(applied, merged)
        return WriteResult(len(changed), len(live) - len(changed), len(doomed), stale=len(stale))

    def _write(
        self,
        write: ShardWrite,
        stale: set[str],
        entries: dict[str, Entry],
        doomed: set[str],
        changed: list[tuple[dict[str, Any], int]],
    ) -> tuple[int, Offsets]:
        """The write steps of :meth:`apply`; returns the change in document rows and the offsets
        it raised."""
        self._check_owner()
        self._delete(self._chunks, "chunk_id", sorted(doomed))
        for batch in sized_batches([row for row, _ in changed], [size for _, size in changed]):
            self._call("upsert chunks", self._milvus().upsert, self._chunks, batch)
        self._check_owner()
        documents = self._write_entries(write, stale, entries)
        self._sync(self._chunks, self._ledger)  # durable before the offsets cover them
        self._check_owner()
        merged = self._merge_offsets(write.offsets)
        self._sync(self._ledger)
        return documents, merged

    # -- reads ----------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        """Top ``k`` (at most :data:`MAX_TOP_K`) by inner product per row of ``vectors``, best first."""
        queries = check_queries(vectors, self._dim, k, self._where)
        if len(queries) == 0:
            return []
        results = self._call(
            "search",
            self._milvus().search,
            self._chunks,
            data=list(queries),
            anns_field="vector",
            limit=min(k, MAX_TOP_K),
            filter=expression(filter),
            output_fields=HIT_FIELDS,
            search_params=search_params(self._config, k),
            consistency_level=self._config.consistency_level,
        )
        return [[hit(h["entity"], float(h["distance"])) for h in hits] for hits in results]

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
        expr = expression(filter)
        out: list[list[Hit]] = []
        for query_words in words(list(queries), distinct=True):
            if not query_words or k < 1:
                out.append([])
                continue
            ranked = self._fused(" ".join(query_words[:MAX_QUERY_WORDS]), k, expr, title_weight)
            found = {r["chunk_id"]: r for r in self._query_ids([cid for cid, _ in ranked], HIT_FIELDS)}
            out.append([hit(found[cid], score) for cid, score in ranked if cid in found])
        return out

    def metadata_fields(self) -> set[str]:
        """Every metadata key some chunk has. Scans every chunk's ``kinds`` (Milvus keeps no
        catalogue of JSON keys): O(chunks), so callers cache it."""
        fields: set[str] = set()
        for row in self._scan(self._chunks, "", ["kinds"]):
            fields.update(row["kinds"])
        return fields

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        found = {r["chunk_id"]: record(r) for r in self._query_ids(list(chunk_ids), CHUNK_FIELDS)}
        return [found.get(c) for c in chunk_ids]

    def count(self) -> int:
        """Live chunks, counted at open and moved by each write: O(1) (see the module doc)."""
        return self._counted().chunks

    def vector_count(self) -> int:
        """Live vectors: the chunks themselves, since Milvus keeps each vector in its chunk's row
        (there is no separate structure to drift), so this equals :meth:`count`."""
        return self.count()

    def document_count(self) -> int:
        """Document rows (the documents whose registry shard this is); O(1) as :meth:`count`."""
        return self._counted().documents

    def document_ids(self) -> set[str]:
        """Ids of the documents with a chunk here; scans every chunk (tools and tests only)."""
        return {r["document_id"] for r in self._scan(self._chunks, "", ["document_id"])}

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        counts = dict.fromkeys(document_ids, 0)
        for batch in batches(list(counts)):
            for row in self._scan(self._chunks, f"document_id in {id_list(batch)}", ["document_id"]):
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
        rows = self._scan(self._chunks, "", CHUNK_FIELDS, limit, after=after)
        return sorted((record(r) for r in rows), key=lambda r: r.chunk_id)

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        """At most ``limit`` ledger documents with ids after ``after``, by ascending id."""
        expr = f'kind in ["{DOCUMENT}", "{VERSION_ONLY}"]'
        rows = self._scan(self._ledger, expr, ["key", "value"], limit, after=document_key(after))
        entries = sorted((r["key"][2:], entry(r["value"])) for r in rows)
        return [DocumentEntry(d, e.row, e.version) for d, e in entries]

    def offsets(self) -> Offsets:
        """``{topic: {partition: next_offset}}`` covered by completed writes (kept as the counts)."""
        applied = self._offsets
        if applied is None:
            with self._lock:
                if self._offsets is None:
                    self._offsets = offsets(self._query(self._ledger, _OFFSETS, ["value"], strong=True))
                applied = self._offsets
        return {topic: dict(partitions) for topic, partitions in applied.items()}

    # -- persistence ----------------------------------------------------------------------

    def snapshot(self) -> None:
        """Milvus Lite: flushes both collections into sealed segments with built indexes (Lite
        searches unflushed rows by brute force, and slowly) and fsyncs them. A server: nothing
        (it flushes by itself; flushes on demand are rate-limited and make small segments)."""
        if self._lite is None:
            return
        with self._lock:
            for name in (self._chunks, self._ledger):
                self._call(f"flush {name}", self._milvus().flush, name)
            self._sync(self._chunks, self._ledger)

    def restore(self) -> None:
        """Loads both collections (needed after a restart; a no-op when loaded)."""
        with self._lock:
            for name in (self._chunks, self._ledger):
                self._call(f"load {name}", self._milvus().load_collection, name)

    def close(self) -> None:
        """Closes the client and, for Milvus Lite, stops its server once no object of this process
        uses the data dir (releasing it for other processes). Stopping Lite flushes its log into
        segments, which are then fsynced. Idempotent."""
        with self._lock:
            client, self._client = self._client, None
            lite, self._lite = self._lite, None
            files, self._files = self._files, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a client whose server is gone
                client.close()
        if lite is not None and release_lite(lite) and files is not None:
            try:
                files.sync([self._chunks, self._ledger])
            except OSError as exc:
                log.warning("%s: the segments written at close are not fsynced: %s", self._where, exc)

    # -- opening --------------------------------------------------------------------------

    def _open_store(self, model: str, dim: int) -> dict[str, Any]:
        """Creates what is missing (chunks, ledger, their indexes, then the meta row) and loads
        both collections, so that an opening cut off at any call is completed by the next one;
        checks the meta row of an existing store first. Then claims the store and counts it."""
        has_chunks, has_ledger = self._has(self._chunks), self._has(self._ledger)
        meta = None
        if has_ledger:
            self._ensure_indexes(self._ledger, LEDGER_INDEXES)  # a server loads none lacking one
            self._call("load ledger", self._milvus().load_collection, self._ledger)
            meta = self._meta()
        if meta is not None:
            check_meta(meta, model, dim, self._index_name, self._shard, self._where)
            if not has_chunks:
                raise IndexUnavailableError(
                    f"{self._where}: the ledger exists but its chunks collection is gone"
                )
        elif has_chunks:
            self._check_chunks_dim(dim)  # made by an opening cut off before the meta row
        else:
            lite = is_milvus_lite(self._milvus(), self._config.timeout_s)
            self._create(self._chunks, chunks_schema(self._milvus(), dim, analyzer(lite)))
        if not has_ledger:
            self._create(self._ledger, ledger_schema(self._milvus()))
            self._ensure_indexes(self._ledger, LEDGER_INDEXES)
        self._ensure_indexes(self._chunks, chunk_indexes(self._config))
        self.restore()
        if self._lite is not None:
            self._files = LiteFiles(self._lite)
            self._files.check([self._chunks, self._ledger], self._where)
        if meta is None:
            meta = new_meta(model, dim, self._index_name, self._shard)
            self._put_ledger([ledger_row(META, META, meta)])
            log.info("%s: created (store %s)", self._where, meta["store_id"])
        self._put_ledger([ledger_row(OWNER, OWNER, {"token": self._owner})])
        self._sync(self._chunks, self._ledger)
        self._counts = self._recount()
        self._offsets = offsets(self._query(self._ledger, _OFFSETS, ["value"], strong=True))
        return meta

    def _has(self, collection: str) -> bool:
        return bool(self._call(f"has {collection}", self._milvus().has_collection, collection))

    def _meta(self) -> dict[str, Any] | None:
        rows = self._query_keys([META], strong=True)
        return dict(rows[0]["value"]) if rows else None

    def _check_chunks_dim(self, dim: int) -> None:
        description = self._call("describe chunks", self._milvus().describe_collection, self._chunks)
        stored = vector_dim(description)
        if stored != dim:
            raise ConfigError(
                f"{self._where}: its chunks collection holds vectors of dim {stored}, not {dim} (an "
                "opening with another model was cut off): drop the collection or use that model"
            )

    def _create(self, collection: str, schema: Any) -> None:
        self._call(
            f"create {collection}",
            self._milvus().create_collection,
            collection,
            schema=schema,
            consistency_level=self._config.consistency_level,
        )

    def _ensure_indexes(self, collection: str, specs: Iterable[IndexSpec]) -> None:
        """Creates each missing index and rebuilds one that follows the config and was built
        otherwise (released first: Milvus drops an index only then; loaded again by the caller)."""
        client = self._milvus()
        for spec in specs:
            info = self._call(
                f"describe index {collection}.{spec.field}", client.describe_index, collection, spec.field
            )
            if info is not None and (not spec.follow or spec.built_as(info)):
                continue
            if info is not None:
                log.warning(
                    "%s: rebuilding the %s index as %s (it was %s)",
                    self._where,
                    spec.field,
                    spec.params(),
                    info,
                )
                self._call(f"release {collection}", client.release_collection, collection)
                self._call(f"drop index {collection}.{spec.field}", client.drop_index, collection, spec.field)
            self._index(collection, spec)

    def _index(self, collection: str, spec: IndexSpec) -> None:
        """Creates the index ``spec`` without waiting for it to be built (pymilvus would poll every
        0.5 s; it is built when loaded). Through the client's connection rather than
        ``MilvusClient.create_index``, which (pymilvus 3.0.2) sends build parameters only as
        top-level keys, where Milvus Lite 3.2.2 does not read them (see :meth:`IndexSpec.params`);
        with the client's call context, which carries ``db_name``."""
        client = self._milvus()
        self._call(
            f"index {collection}.{spec.field}",
            client._get_connection().create_index,
            collection,
            spec.field,
            spec.params(),
            index_name=spec.field,
            sync=False,
            context=client._generate_call_context(),
        )

    # -- write steps ----------------------------------------------------------------------

    def _chunk_rows(
        self, records: Sequence[ChunkRecord], matrix: np.ndarray
    ) -> list[tuple[dict[str, Any], int]]:
        """The Milvus rows of ``records`` with their sizes; :class:`ProcessingError` naming the
        first chunk with a value Milvus cannot store (checked before anything is written)."""
        text_words = words([r.text for r in records])
        title_words = words([r.title or "" for r in records])
        return [
            chunk_row(r, matrix[i], text_words[i], title_words[i], f"{self._where}: chunk {r.chunk_id!r}")
            for i, r in enumerate(records)
        ]

    def _doomed(self, write: ShardWrite, stale: set[str]) -> set[str]:
        """The stored chunk ids that the write's truncations and deletions remove (one query per
        batch of documents: every versioned update truncates its document)."""
        keep = {d: n for d, n in write.truncate.items() if d not in stale}
        keep.update(dict.fromkeys((d for d in write.delete_documents if d not in stale), 0))
        doomed: set[str] = set()
        for batch in batches(list(keep)):
            expr = f"document_id in {id_list(batch)}"
            for row in self._scan(self._chunks, expr, ["document_id", "number"], strong=True):
                if row["number"] >= keep[row["document_id"]]:
                    doomed.add(row["chunk_id"])
        wanted = [c for c in write.delete_chunks if document_of(c) not in stale]
        doomed.update(r["chunk_id"] for r in self._query_ids(wanted, ["chunk_id"], strong=True))
        return doomed

    def _stored(self, chunk_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """The stored content of those of ``chunk_ids`` that exist (see :func:`content`)."""
        rows = self._query_ids(chunk_ids, CHUNK_FIELDS, strong=True)
        return {r["chunk_id"]: content(record(r)) for r in rows}

    def _write_entries(self, write: ShardWrite, stale: set[str], entries: dict[str, Entry]) -> int:
        """Sets the ledger row of every document whose row or version the write changes, in
        :class:`ShardWrite`'s order (a deletion, then a new row, then the version); returns the
        change in the number of document rows."""
        changed: dict[str, Entry] = {}

        def now(document_id: str) -> Entry:
            return changed.get(document_id, entries.get(document_id, NOTHING))

        for d in (d for d in write.delete_documents if d not in stale):
            changed[d] = Entry(None, now(d).version)
        for d, row in write.documents.items():
            if d not in stale:
                changed[d] = Entry(row, now(d).version)
        for d, version in write.versions.items():
            if d not in stale:
                changed[d] = Entry(now(d).row, version)
        changed = {d: e for d, e in changed.items() if e != entries.get(d, NOTHING)}
        self._put_ledger([document_row(d, e) for d, e in changed.items() if e != NOTHING])
        self._delete(self._ledger, "key", [document_key(d) for d, e in changed.items() if e == NOTHING])
        return sum(
            (e.row is not None) - (entries.get(d, NOTHING).row is not None) for d, e in changed.items()
        )

    def _merge_offsets(self, wanted: Mapping[str, Mapping[int, int]]) -> Offsets:
        """Raises each stored offset to the write's when the write's is higher; returns those raised."""
        targets = {
            offset_key(t, int(p)): (t, int(p), int(o)) for t, ps in wanted.items() for p, o in ps.items()
        }
        stored = {r["key"]: int(r["value"]["next"]) for r in self._query_keys(list(targets), strong=True)}
        raised = [(t, p, o) for key, (t, p, o) in targets.items() if o > stored.get(key, -1)]
        self._put_ledger([offset_row(t, p, o) for t, p, o in raised])
        result: Offsets = {}
        for t, p, o in raised:
            result.setdefault(t, {})[p] = o
        return result

    def _check_owner(self) -> None:
        """:class:`IndexUnavailableError` when another writer opened the store since this one."""
        rows = self._query_keys([OWNER], strong=True)
        owner = rows[0]["value"].get("token") if rows else None
        if owner != self._owner:
            raise IndexUnavailableError(
                f"{self._where}: another writer opened this store since this one did (owner {owner}, this "
                f"one {self._owner}); this one writes no more: reopen the shard to write again"
            )

    def _sync(self, *collections: str) -> None:
        """Milvus Lite: fsyncs what it wrote for ``collections`` (see :class:`LiteFiles`)."""
        if self._files is not None:
            self._files.sync(collections)

    def _put_ledger(self, rows: list[dict[str, Any]]) -> None:
        for batch in batches(rows):
            self._call("upsert ledger", self._milvus().upsert, self._ledger, batch)

    def _delete(self, collection: str, key: str, ids: list[str]) -> None:
        for batch in batches(ids):
            self._call(
                f"delete from {collection}",
                self._milvus().delete,
                collection,
                filter=f"{key} in {id_list(batch)}",
            )

    # -- read steps -----------------------------------------------------------------------

    def _counted(self) -> _Counts:
        counts = self._counts
        if counts is None:
            with self._lock:  # after the write in progress, if any
                if self._counts is None:
                    self._counts = self._recount()
                counts = self._counts
        return counts

    def _recount(self) -> _Counts:
        chunks = self._query(self._chunks, "", ["count(*)"], strong=True)
        documents = self._query(self._ledger, _DOCUMENTS, ["count(*)"], strong=True)
        return _Counts(int(chunks[0]["count(*)"]), int(documents[0]["count(*)"]))

    def _entries(self, document_ids: Iterable[str], strong: bool = False) -> dict[str, Entry]:
        keys = [document_key(d) for d in dict.fromkeys(document_ids)]
        return {r["key"][2:]: entry(r["value"]) for r in self._query_keys(keys, strong)}

    def _query_keys(self, keys: list[str], strong: bool = False) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in batches(keys):
            rows += self._query(self._ledger, f"key in {id_list(batch)}", ["key", "value"], strong)
        return rows

    def _query_ids(
        self, chunk_ids: list[str], fields: list[str], strong: bool = False
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for batch in batches(list(dict.fromkeys(chunk_ids))):
            rows += self._query(self._chunks, f"chunk_id in {id_list(batch)}", fields, strong)
        return rows

    def _query(
        self, collection: str, expr: str, fields: list[str], strong: bool = False, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Rows of ``collection`` matching ``expr``: Strong, or at the configured consistency level."""
        return self._call(
            f"query {collection}",
            self._milvus().query,
            collection,
            filter=expr,
            output_fields=fields,
            consistency_level="Strong" if strong else self._config.consistency_level,
            **kwargs,
        )

    def _scan(
        self,
        collection: str,
        expr: str,
        fields: list[str],
        limit: int | None = None,
        after: str | None = None,
        strong: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Every row matching ``expr`` (at most ``limit``, primary keys above ``after``), read page
        by page in primary-key order. pymilvus's own query iterator writes the last key of a page
        into the next page's expression unescaped (a key holding ``"`` breaks it), so this one
        pages itself, with the same ``iterator`` hint that makes Milvus answer in key order."""
        pk = "chunk_id" if collection == self._chunks else "key"
        while limit is None or limit > 0:
            size = SCAN_BATCH if limit is None else min(limit, SCAN_BATCH)
            parts = ([] if after is None else [f"{pk} > {milvus_literal(after)}"]) + (
                [f"({expr})"] if expr else []
            )
            fetched = list(dict.fromkeys([pk, *fields]))
            page = self._query(collection, " and ".join(parts), fetched, strong, limit=size, iterator="True")
            page.sort(key=lambda row: row[pk])
            yield from page
            if len(page) < size:
                return
            after, limit = page[-1][pk], None if limit is None else limit - len(page)

    def _fused(self, query: str, k: int, expr: str, title_weight: float) -> list[tuple[str, float]]:
        """The top ``k`` ``(chunk_id, text BM25 + title_weight * title BM25)``, best first (ties by
        id), each field's list deepened until the sum is exact (see :func:`fuse`)."""
        fields = [("text_bm25", 1.0)] + ([("title_bm25", title_weight)] if title_weight > 0 else [])
        limit = min(max(4 * k, 64), MAX_TOP_K)
        while True:
            lists = [self._bm25(field, query, limit, expr) for field, _ in fields]
            ranked, exact = fuse(lists, [w for _, w in fields], k, limit)
            if exact or limit >= MAX_TOP_K:
                return ranked
            limit = min(4 * limit, MAX_TOP_K)

    def _bm25(self, field: str, query: str, limit: int, expr: str) -> list[tuple[str, float]]:
        [hits] = self._call(
            "keyword search",
            self._milvus().search,
            self._chunks,
            data=[query],
            anns_field=field,
            limit=limit,
            filter=expr,
            output_fields=[],
            search_params={"metric_type": "BM25"},
            consistency_level=self._config.consistency_level,
        )
        # Milvus Lite answers -score, a server +score: BM25 of a match is always positive
        return [(h["chunk_id"], abs(float(h["distance"]))) for h in hits]

    # -- calls ----------------------------------------------------------------------------

    def _milvus(self) -> Any:
        client = self._client
        if client is None:
            raise IndexUnavailableError(f"{self._where} is closed")
        return client

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` within ``timeout_s``, its failure raised as the Riverbed error it
        is (:func:`actors.milvus_client.error_class`) or noted with the shard and the call. A
        collection found not loaded is loaded again (quietly) before the retryable error is raised."""
        try:
            return fn(*args, timeout=self._config.timeout_s, **kwargs)
        except Exception as exc:
            error = error_class(exc)
            if error is None:
                exc.add_note(f"{self._where}: {what}")
                raise
            if milvus_code(exc) == _NOT_LOADED:
                self._reload_quietly()
            raise error(f"{self._where}: {what} failed: {exc}") from exc

    def _reload_quietly(self) -> None:
        client = self._client
        for name in (self._chunks, self._ledger):
            with contextlib.suppress(Exception):  # the retry that follows says what is wrong
                client.load_collection(name, timeout=self._config.timeout_s)


def _merged(applied: Offsets, raised: Offsets) -> Offsets:
    result = {topic: dict(partitions) for topic, partitions in applied.items()}
    for topic, partitions in raised.items():
        result.setdefault(topic, {}).update(partitions)
    return result


def stored_state(path: Path, config: MilvusConfig, *, index_name: str, shard: int) -> StoredState | None:
    """What shard ``shard``'s store holds, or None when it has none yet, read Strong. Changes no
    content. A server: creates nothing. Milvus Lite, unless this process has the data dir open
    already: starts a server on it (which replays its log and builds the indexes of its
    segments: seconds for a large store) and stops it, which flushes the log into segments, then
    fsynced. Raises :class:`StoreUnreadableError` when it cannot be read (server down; embedded:
    the data dir open in another process)."""
    if config.uri is None and not (path / DB_NAME).exists():
        return None
    chunks, ledger = collection_names(config, index_name, shard)
    where = f"milvus shard {shard} ({chunks} at {config.uri or path / DB_NAME})"
    try:
        client, lite = connect(path, config, where)
    except RetryableError as exc:
        raise StoreUnreadableError(str(exc)) from exc
    read = {"timeout": config.timeout_s, "consistency_level": "Strong"}
    try:
        if not client.has_collection(ledger, timeout=config.timeout_s) or not client.has_collection(
            chunks, timeout=config.timeout_s
        ):
            return None
        for name in (ledger, chunks):  # a server keeps a collection loaded for the shards
            client.load_collection(name, timeout=config.timeout_s)
        meta = client.query(ledger, filter=f"key in {id_list([META])}", output_fields=["value"], **read)
        if not meta:
            return None
        applied = offsets(client.query(ledger, filter=_OFFSETS, output_fields=["value"], **read))
        [n_chunks] = client.query(chunks, filter="", output_fields=["count(*)"], **read)
        [n_docs] = client.query(ledger, filter=_DOCUMENTS, output_fields=["count(*)"], **read)
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
        if lite is not None and release_lite(lite):
            LiteFiles(lite).sync([chunks, ledger])  # stopping Lite flushed its log into segments


def drop_store(path: Path, config: MilvusConfig, *, index_name: str, shard: int) -> None:
    """Drops shard ``shard``'s collections (a throwaway index), those that exist. Milvus Lite's
    data dir is left to the caller, who deletes the directory."""
    names = collection_names(config, index_name, shard)
    where = f"milvus shard {shard} ({names[0]} at {config.uri or path / DB_NAME})"
    client, lite = connect(path, config, where)
    try:
        for name in names:
            if client.has_collection(name, timeout=config.timeout_s):
                client.drop_collection(name, timeout=config.timeout_s)
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if lite is not None:
            release_lite(lite)
