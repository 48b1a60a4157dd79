"""The contract of an index shard, as three roles a backend fills or shares, plus their composition.

- :class:`Ledger`: the shard's truth. Chunk rows (text, span, metadata, vector), document rows,
  per-document versions and the applied Kafka offsets; every write goes through it.
- :class:`VectorSearch`: the vector structure, searched by inner product under a metadata filter.
- :class:`KeywordSearch`: BM25 over the chunks' text and titles, under the same filter.

:class:`VectorIndex` is ``Ledger`` + ``VectorSearch`` (every backend); keyword search is optional.
Which part of each backend fills which role:

- :class:`actors.faiss_index.FaissIndex`: ledger = the SQLite :class:`actors.shard_store.ShardStore`
  in the shard directory; keyword = FTS5 in that same SQLite file, kept in step by triggers inside
  the write's transaction; vector search = a FAISS structure (flat, IVF or HNSW) in memory, derived
  from the store's vectors and always rebuildable from them (a snapshot only speeds up restarts).
- :class:`actors.milvus_index.MilvusIndex` (Milvus Lite embedded, or a server reached by uri; see
  :mod:`actors.milvus_layout`): ledger = the ``chunks`` collection's rows plus the ``ledger``
  collection (document rows, versions, offsets, the store's identity and writer); vector search =
  the vector index on ``chunks.vector`` (FLAT, HNSW or IVF_FLAT); keyword = BM25 sparse indexes on
  ``chunks`` (``text_bm25``, ``title_bm25``) that Milvus derives from the chunk's words on upsert.
- :class:`actors.testing.InMemoryIndex`: ledger = dicts; vector search = numpy brute force (exact,
  with :meth:`MetadataFilter.matches` as its filter: the contract tests' oracle); no keyword search.

So FAISS shares one SQLite file between the ledger and the keyword index, and Milvus one
collection between chunk rows, vectors and keyword vectors: in both, one write updates all three.

The contract tests state each role as a mixin (``tests/contract/``: write, ledger, search,
filter, keyword, persistence); each backend's test class combines the ones it fills
(``tests/unit/test_backend_*.py``).

Scores are inner products: cosine similarity for the L2-normalised vectors the embedder writes.
Higher is better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, runtime_checkable

import numpy as np
from typing_extensions import TypeVar

from schemas.filters import MetadataFilter
from schemas.ids import chunk_id as make_chunk_id
from schemas.metadata import MetadataValue, metadata_problem
from schemas.topology import Version

__all__ = [
    "ChunkRecord",
    "DocumentEntry",
    "DocumentRow",
    "Hit",
    "KeywordSearch",
    "Ledger",
    "MetadataValue",
    "ShardWrite",
    "VectorIndex",
    "VectorSearch",
    "WriteConveniences",
    "WriteResult",
    "check_queries",
    "check_records",
    "exact_top_k",
]


@dataclass(frozen=True, eq=False)
class ChunkRecord:
    """One chunk with its vector, as written to a shard. ``chunk_id`` must equal
    ``schemas.ids.chunk_id(document_id, number)``: truncation by ``number`` relies on it.

    ``start``/``end``: code-point span of the chunk in the document's ``text``.
    ``vector``: float32, shape ``(dim,)``, L2-normalised by the embedder (not re-checked here).
    ``alignment``: where each code point of ``text`` lies in the document's text, as the chunker
    stores it (plain text, see :mod:`actors.alignment`): ``""`` when position ``i`` is ``start +
    i``, JSON pieces otherwise, None when not known (a chunk stored before alignments were).
    Backends store and return it as it is.
    """

    chunk_id: str
    document_id: str
    number: int
    text: str
    title: str | None
    start: int
    end: int
    metadata: Mapping[str, MetadataValue]
    vector: np.ndarray
    alignment: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_id != make_chunk_id(self.document_id, self.number):
            raise ValueError(f"chunk_id {self.chunk_id!r} is not chunk {self.number} of {self.document_id!r}")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"chunk {self.chunk_id!r}: bad span [{self.start}, {self.end})")
        if self.alignment is not None and not isinstance(self.alignment, str):
            raise ValueError(f"chunk {self.chunk_id!r}: alignment must be a str or None")
        # The one definition of what metadata may hold: anything else would make SQL filters
        # disagree with MetadataFilter.matches, or could not be stored at all.
        if (problem := metadata_problem(self.metadata)) is not None:
            raise ValueError(f"chunk {self.chunk_id!r}: {problem}")
        # A private copy: the caller's dict may change after the write. A plain dict (not a
        # MappingProxyType) so records pickle across Ray actors.
        object.__setattr__(self, "metadata", dict(self.metadata))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkRecord):
            return NotImplemented
        return self.without_vector() == other.without_vector() and np.array_equal(self.vector, other.vector)

    __hash__ = None  # type: ignore[assignment]  # holds a dict and an array

    def without_vector(self) -> tuple[object, ...]:
        return (self.chunk_id, self.document_id, self.number, self.text, self.title,
                self.start, self.end, self.metadata, self.alignment)  # fmt: skip


@dataclass(frozen=True)
class Hit:
    """One search result. ``score``: inner product with the query (or BM25); higher is better.
    ``alignment``: the chunk's, as written (see :class:`ChunkRecord`)."""

    chunk_id: str
    document_id: str
    number: int
    text: str
    title: str | None
    start: int
    end: int
    metadata: Mapping[str, MetadataValue]
    score: float
    alignment: str | None = None

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)


@dataclass(frozen=True)
class DocumentRow:
    """Per-document bookkeeping for ingest: the hash of the content last indexed and its total
    chunk count (over all shards; chunks themselves are routed by chunk id)."""

    content_hash: str
    n_chunks: int
    source: tuple[str, int, int] | None = None
    """``(topic, partition, offset)`` of the record whose content this is (None: not from Kafka)."""

    def __post_init__(self) -> None:
        if self.n_chunks < 0:
            raise ValueError(f"n_chunks must be >= 0, got {self.n_chunks}")
        if self.source is not None:
            topic, partition, offset = self.source
            if not (isinstance(topic, str) and _is_int(partition) and _is_int(offset)):
                raise ValueError(f"source must be (topic, partition, offset), got {self.source!r}")


@dataclass(frozen=True)
class DocumentEntry:
    """One document in a shard's ledger, as :meth:`VectorIndex.scan_documents` lists it: its row
    (None when this is not its registry shard, or it was deleted) and the version last applied to
    it here (None: never versioned here). A deleted document keeps its version, so that an older
    change arriving later is refused."""

    document_id: str
    row: DocumentRow | None
    version: Version | None


class Keyed(Protocol):
    """A record a shard upserts by its ``chunk_id``: a :class:`ChunkRecord` (vector shards) or
    another kind of shard's record (a graph shard's ``ChunkGraph``)."""

    @property
    def chunk_id(self) -> str: ...


R = TypeVar("R", bound=Keyed, default=ChunkRecord)


@dataclass(frozen=True)
class ShardWrite(Generic[R]):
    """Everything one batch changes in one shard, applied as ONE atomic, durable transaction, in
    this order:

    1. ``truncate``: for each ``(document_id, keep)`` delete that document's chunks with
       ``number >= keep`` (an updated document that now has fewer chunks);
    2. ``delete_documents``: delete every chunk and the document row of each id;
    3. ``delete_chunks``: delete these chunk ids;
    4. ``upserts``: insert or replace by ``chunk_id`` (the last of duplicates wins). A record
       equal to the stored one is skipped, so re-applying a write changes nothing;
    5. ``documents``: set each document's row (content hash, total chunk count);
    6. ``offsets``: ``{topic: {partition: next_offset}}`` this write covers, max-merged with the
       stored ones (a re-delivered, older batch never moves them back).

    ``versions``: ``{document_id: (topic, partition, offset)}``, the record each document's change
    comes from. A versioned document's parts of the write (its chunks' upserts and deletions, its
    truncation, its deletion, its row) apply only when the version is not older than the one the
    shard holds for it (:func:`schemas.topology.is_older`: same topic and partition, lower
    offset); otherwise they are all skipped and the document counts in ``WriteResult.stale``.
    Applied, the version is stored, for a deletion too, so an older change arriving after it is
    refused. The same version again is a re-delivery (idempotent); one from another partition is
    not comparable and applies. Documents not in ``versions`` always apply and keep their version.
    """

    upserts: Sequence[R] = ()
    truncate: Mapping[str, int] = field(default_factory=dict)
    delete_documents: Sequence[str] = ()
    delete_chunks: Sequence[str] = ()
    documents: Mapping[str, DocumentRow] = field(default_factory=dict)
    offsets: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    versions: Mapping[str, Version] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for document_id, keep in self.truncate.items():
            if not _is_int(keep) or keep < 0:
                raise ValueError(f"truncate[{document_id!r}] must be an int >= 0, got {keep!r}")
        for name, ids in (("delete_documents", self.delete_documents),
                          ("delete_chunks", self.delete_chunks)):  # fmt: skip
            if isinstance(ids, str):
                raise ValueError(f"{name} must be a sequence of ids, not the string {ids!r}")
        for topic, positions in self.offsets.items():
            for partition, offset in positions.items():
                if not (_is_int(partition) and _is_int(offset) and partition >= 0 and offset >= 0):
                    raise ValueError(f"offsets[{topic!r}][{partition!r}] = {offset!r}: need ints >= 0")
        # As plain tuples of str and int (numpy ints and lists would compare and bind differently).
        object.__setattr__(self, "versions", {d: _version(d, v) for d, v in self.versions.items()})

    def unique_upserts(self) -> list[R]:
        """``upserts`` with duplicates removed, the last one of each chunk id kept."""
        return list({r.chunk_id: r for r in self.upserts}.values())


@dataclass(frozen=True)
class WriteResult:
    """What an ``apply`` changed: chunks inserted or replaced, skipped as identical, deleted, and
    documents whose change was skipped as older than the stored version (``stale``)."""

    upserted: int
    unchanged: int
    deleted: int
    stale: int = 0


class WriteConveniences:
    """``upsert`` and ``delete`` in terms of a backend's ``apply``: one write path per backend."""

    def apply(self, write: ShardWrite) -> WriteResult:
        raise NotImplementedError

    def upsert(self, records: Sequence[ChunkRecord]) -> WriteResult:
        return self.apply(ShardWrite(upserts=records))

    def delete(self, chunk_ids: Sequence[str]) -> int:
        """Deletes these chunks; returns how many existed."""
        return self.apply(ShardWrite(delete_chunks=chunk_ids)).deleted


@runtime_checkable
class Ledger(Protocol):
    """The shard's truth: chunk rows, document rows, versions and applied offsets.

    - Writes go through :meth:`apply` (``upsert``/``delete`` are shorthands): one atomic write,
      durable when it returns (persistent backends), idempotent (re-applying a :class:`ShardWrite`
      leaves the same state). Wrong vectors raise ``ValueError`` and write nothing. The roles that
      derive from the chunk rows (vector structure, keyword index) see each write once it returns.
    - :meth:`get` answers in the order asked, None for unknown ids; ``document_chunk_counts`` has
      every id asked (0 when absent); ``get_document_rows``/``get_document_hashes`` only known ones.
    - Writes are versioned per document (see :class:`ShardWrite`); ``get_document_versions``
      answers the stored version of each id that has one.
    - :meth:`count` (live chunks) and :meth:`document_count` (document rows) are cheap enough for
      health checks: O(1) counters (Milvus counts again, O(chunks), once after a failed write).
      ``document_ids`` scans every chunk: for tools and tests only.
    - :meth:`scan_chunks` and :meth:`scan_documents` page through everything the shard holds, by
      ascending id (code point order), strictly after ``after``, at most ``limit`` per call: what
      copying an index to another backend reads (no re-embedding). Each page is consistent; pages
      read while writes go on may miss or repeat changes made between them.
    - :meth:`offsets` are the Kafka positions (``{topic: {partition: next_offset}}``) covered by
      durable writes, max-merged: an older batch never moves them back.
    - One writer at a time; reads may run on other threads. :meth:`close` releases the store
      (and its lock); a closed shard refuses every call.
    """

    def apply(self, write: ShardWrite) -> WriteResult: ...
    def upsert(self, records: Sequence[ChunkRecord]) -> WriteResult: ...
    def delete(self, chunk_ids: Sequence[str]) -> int: ...
    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]: ...
    def count(self) -> int: ...
    def document_count(self) -> int: ...
    def document_ids(self) -> set[str]: ...
    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]: ...
    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]: ...
    def get_document_hashes(self, document_ids: Sequence[str]) -> dict[str, str]: ...
    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]: ...
    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]: ...
    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]: ...
    def offsets(self) -> dict[str, dict[int, int]]: ...
    def close(self) -> None: ...


@runtime_checkable
class VectorSearch(Protocol):
    """The vector structure over the ledger's chunks, for one embedding ``model`` and ``dim``.

    - :meth:`search` takes ``(n, dim)`` float32 queries and returns one list per row, best first,
      at most ``k`` hits (fewer when fewer chunks match). Every hit satisfies the filter, with
      exactly :meth:`MetadataFilter.matches`'s semantics whatever the backend translates it to
      (SQL, a Milvus expression). Approximate structures (IVF, HNSW) may miss near neighbours,
      never return a wrong one. Bad queries (``k < 1``, wrong dtype or shape) raise ``ValueError``.
    - :meth:`vector_count`: live vectors in the structure, counted by the structure itself, so
      ``count() == vector_count()`` checks that it agrees with the ledger. O(1).
    - :meth:`snapshot` only makes :meth:`restore` (run on open) fast: the structure can always be
      rebuilt from the ledger.
    """

    @property
    def model(self) -> str: ...
    @property
    def dim(self) -> int: ...
    def search(
        self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None
    ) -> list[list[Hit]]: ...
    def vector_count(self) -> int: ...
    def snapshot(self) -> None: ...
    def restore(self) -> None: ...


@runtime_checkable
class VectorIndex(Ledger, VectorSearch, Protocol):
    """A vector index shard: a :class:`Ledger` and the :class:`VectorSearch` over it, for one
    embedding ``model`` and ``dim``. What every backend implements (keyword search is optional:
    :class:`KeywordSearch`)."""


@runtime_checkable
class KeywordSearch(Protocol):
    """BM25 keyword search beside the vectors (FAISS: SQLite FTS5 in its store; Milvus: BM25 on
    its chunks collection; the in-memory reference has none).

    ``keyword_search`` returns one list per query string, best first, at most ``k`` hits, every
    one satisfying ``filter``; ``score`` is BM25 (higher is better; comparable within a shard).
    ``title_weight`` (>= 0) weighs matches in the title against those in the text (weight 1). It
    sees exactly the chunks the vector search sees: both are updated by the same writes.

    ``metadata_fields``: the metadata keys some live chunk holds (what a filter may name), for the
    search API's checks. O(keys) with FAISS, O(chunks) with Milvus (no catalogue of JSON keys):
    callers cache it.
    """

    def keyword_search(
        self, queries: Sequence[str], k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[list[Hit]]: ...
    def metadata_fields(self) -> set[str]: ...


def check_records(records: Sequence[ChunkRecord], dim: int, where: str) -> np.ndarray:
    """Stacks the records' vectors into a ``(n, dim)`` float32 matrix, refusing any vector of the
    wrong dtype, shape or with NaN/inf. ``where`` (the shard path) goes into the message."""
    for r in records:
        if not isinstance(r.vector, np.ndarray) or r.vector.dtype != np.float32:
            got = getattr(r.vector, "dtype", type(r.vector).__name__)
            raise ValueError(f"{where}: chunk {r.chunk_id!r}: expected a float32 vector, got {got}")
        if r.vector.shape != (dim,):
            raise ValueError(
                f"{where}: chunk {r.chunk_id!r}: expected a vector of shape ({dim},), got {r.vector.shape}"
            )
    matrix = np.stack([r.vector for r in records]) if records else np.zeros((0, dim), np.float32)
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where}: a vector holds NaN or infinity")
    return matrix


def check_queries(vectors: np.ndarray, dim: int, k: int, where: str) -> np.ndarray:
    """Checks a ``(n, dim)`` float32 query matrix and ``k >= 1``; returns it C-contiguous."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"{where}: k must be an int >= 1, got {k!r}")
    if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32:
        got = getattr(vectors, "dtype", type(vectors).__name__)
        raise ValueError(f"{where}: expected float32 query vectors, got {got}")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{where}: expected queries of shape (n, {dim}), got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{where}: a query vector holds NaN or infinity")
    return np.ascontiguousarray(vectors)


def exact_top_k(queries: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: ``(scores, positions into matrix)``, each
    ``(n, min(k, len(matrix)))``, best first; ties keep the lower position first."""
    kk = min(k, len(matrix))
    scores = queries @ matrix.T
    if kk < len(matrix):
        candidates = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        candidates.sort(axis=1)  # so that the stable sort below breaks ties by position
    else:
        candidates = np.broadcast_to(np.arange(len(matrix)), (len(queries), len(matrix)))
    picked = np.take_along_axis(scores, candidates, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def _version(document_id: str, version: object) -> Version:
    """``version`` as ``(topic, partition, offset)``, or ``ValueError`` naming the document."""
    if isinstance(version, tuple | list) and len(version) == 3:
        topic, partition, offset = version
        ints = _is_int(partition) and _is_int(offset)
        if isinstance(topic, str) and ints and partition >= 0 and offset >= 0:
            return (topic, int(partition), int(offset))
    raise ValueError(f"versions[{document_id!r}] must be (topic, partition >= 0, offset >= 0): {version!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
