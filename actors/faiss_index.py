"""FaissIndex: one index shard, a SQLite :class:`ShardStore` plus an in-memory FAISS structure.

The store is the truth; the FAISS structure (ids = store row ids) is derived from it and can
always be rebuilt from it. :meth:`FaissIndex.snapshot` only makes restarts fast.

Structures (``FaissConfig.kind``), all inner product:

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; deletes use ``remove_ids``.
- ``ivf``: ``IndexIVFFlat`` once the shard holds ``39 * ivf_nlist`` vectors (FAISS's minimum
  for training); below that an exact flat index. It is retrained (rebuilt) when the shard grows
  past 4x the vectors the centroids were trained on, since centroids from a small, early sample
  of a stream describe it poorly. Deletes use ``remove_ids``.
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``. HNSW cannot remove ids, so deleted ids are masked
  (an ``IDSelectorNot`` at search) and the structure is rebuilt from the store once masked ids
  exceed 20% of it.

Filtered search is exact w.r.t. the filter: SQLite gives the matching ids and FAISS searches only
those (``IDSelectorBatch``). A flat index is exact anyway; for IVF and HNSW, when at most
``filter_exact_max`` ids match (or ``k`` covers every vector) the search is exhaustive: every list
probed, or the HNSW vectors scored by brute force, since a graph walk finds few of a sparse set.

Drift: a write is committed to the store first, then mirrored into the FAISS structure. If the
mirroring fails, the write still stands (it is durable; a retry would find its rows unchanged and
add nothing) and the structure is marked stale: it is rebuilt from the store at the next write,
search, count or snapshot, so vector search never stays behind the store. A failing rebuild never
fails a write; searches and counts raise :class:`IndexUnavailableError` until one succeeds.

Readers (:meth:`FaissIndex.reader`): a read replica of a shard for another process (a query
replica), beside the one writer. It builds its own structure from the writer's snapshot (or the
store), and before each vector search or count it takes the writes committed since the seq it
reflects: the seq, the tombstones and the new rows are read in one SQLite read transaction, so
they belong to one commit, and the rows the search then reads (filters, hits) are read in the
same transaction. A snapshot prunes the tombstones older than the snapshot before it, so a reader
that searched since then never needs a pruned one; one that did starts again from the newest
snapshot. So a reader sees every write committed before the call began; keyword search, lookups
and figures read the store directly and see the same. Its IVF centroids and HNSW
graph are its own (built from the same vectors at other moments): approximate kinds may rank a
little differently from the writer's; ``flat`` ranks identically.

Thread safety: one lock serialises writes, searches and snapshots; FAISS parallelises each
search internally (OpenMP). One writer process per shard directory (the store's lock); any
number of readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import faiss
except ModuleNotFoundError as exc:  # FAISS is an extra: riverbed[cpu] or riverbed[gpu]
    if exc.name != "faiss":  # FAISS is there, and something it needs is not: that error says what
        raise
    raise ModuleNotFoundError(
        "index.backend 'faiss' needs FAISS, which is not installed here: pip install 'riverbed[cpu]' "
        "(faiss-cpu), or 'riverbed[gpu]' (faiss-gpu-cuvs, CUDA 13) where faiss-cpu is not installed; "
        "or set index.backend to milvus",
        name="faiss",
    ) from exc

from actors.shard_store import ShardStore
from actors.store_write import StoreChanges
from actors.vector_index import (
    ChunkRecord,
    DocumentEntry,
    DocumentRow,
    Hit,
    ShardWrite,
    WriteConveniences,
    WriteResult,
    check_queries,
    exact_top_k,
)
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError
from schemas.filters import MetadataFilter
from schemas.settings import FaissConfig
from schemas.topology import Offsets, Version

log = logging.getLogger(__name__)
_faiss: Any = faiss  # faiss-cpu's bundled stubs lack the SearchParameters classes and their arguments

SNAPSHOT_FORMAT = 1
IVF_MIN_PER_LIST = 39  # FAISS warns that k-means needs at least 39 points per centroid
_IVF_RETRAIN_GROWTH = 4
_HNSW_MAX_MASKED = 0.2
# Fields that shape the stored structure; a snapshot built with others is rebuilt, not loaded.
_STRUCTURAL = ("kind", "ivf_nlist", "hnsw_m", "hnsw_ef_construction")


class FaissIndex(WriteConveniences):
    """A FAISS index shard stored in ``path`` (a directory), implementing ``VectorIndex``.

    Opening restores the structure: the snapshot plus the store's writes after it, or a rebuild
    from the store when the snapshot is missing, corrupt or made with another model or config.
    Raises :class:`ConfigError` when the store was written for another model or dim.
    ``max_bytes``: the store's quota (see :meth:`set_max_bytes`).
    """

    def __init__(
        self,
        path: Path,
        model: str,
        dim: int,
        config: FaissConfig | None = None,
        *,
        max_bytes: int | None = None,
        _reader: bool = False,
    ) -> None:
        self.path = path
        self._config = config or FaissConfig()
        if self._config.omp_threads is not None:
            faiss.omp_set_num_threads(self._config.omp_threads)  # process-wide: one shard per actor
        self._lock = threading.RLock()
        self._reader = _reader
        self._store: ShardStore | None = (
            ShardStore.read_only(path) if _reader else ShardStore(path, model, dim, max_bytes=max_bytes)
        )
        self._index: Any = None  # a faiss.Index
        self._masked = np.zeros(0, np.int64)  # hnsw: ids deleted from the store, still in FAISS
        self._trained_on = 0  # ivf: vectors the centroids were trained on; 0 while flat
        self._stale = False  # a mirroring failed: rebuild from the store before the next use
        self._seq = 0  # the store's seq the structure reflects (what a reader catches up from)
        self._snapshot_seq = 0  # the seq of the snapshot on disk (0: none)
        try:
            self.restore()
        except BaseException:
            self.close()
            raise

    @classmethod
    def reader(cls, path: Path, config: FaissConfig | None = None) -> FaissIndex:
        """A read replica of the shard stored in ``path`` (see the module's "Readers"): it takes
        no lock, refuses writes and snapshots, and sees every write committed before each call.
        ``config`` must be the writer's (its structure kind and parameters)."""
        return cls(path, "", 0, config, _reader=True)

    @property
    def seq(self) -> int:
        """The store's seq the vector structure reflects."""
        return self._seq

    @property
    def model(self) -> str:
        return self._open().model

    @property
    def dim(self) -> int:
        return self._open().dim

    @property
    def store_id(self) -> str:
        """The store's identity, made when it was created (or first upgraded)."""
        return self._open().store_id

    # -- writes ---------------------------------------------------------------------------

    def apply(self, write: ShardWrite) -> WriteResult:
        """Applies ``write`` durably (see :class:`ShardWrite` for order, versions and idempotence),
        then mirrors it in the FAISS structure. Raises what :meth:`ShardStore.apply` raises (then
        nothing was written). A failure to mirror does not fail the write (see the module's
        "Drift")."""
        with self._lock:
            changes = self._writable().apply(write)
            self._follow(changes)
            self._seq = changes.seq
            return changes.result

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Sets the store's quota (see :meth:`ShardStore.set_max_bytes`); None lifts it."""
        with self._lock:
            self._writable().set_max_bytes(max_bytes)

    # -- reads ----------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, filter: MetadataFilter | None = None) -> list[list[Hit]]:
        """Top ``k`` hits per row of ``vectors`` (``(n, dim)`` float32), best first."""
        queries = check_queries(vectors, self.dim, k, f"shard {self.path}")
        with self._lock, self._reading() as store:
            live = self._live()
            if live == 0 or len(queries) == 0:
                return [[] for _ in range(len(queries))]
            allowed, exact = None, k >= live  # an approximate search may miss some of few
            if filter is not None and filter.conditions:
                allowed = store.filter_ids(filter)
                exact = len(allowed) <= max(self._config.filter_exact_max, k)
            return store.hits(*self._search(queries, k, allowed, exact))

    def keyword_search(
        self, queries: Sequence[str], k: int, filter: MetadataFilter | None = None, title_weight: float = 0.5
    ) -> list[list[Hit]]:
        """BM25 top ``k`` per query string (see :meth:`ShardStore.keyword_search`)."""
        store = self._open()
        return [store.keyword_search(q, k, filter, title_weight) for q in queries]

    def metadata_fields(self) -> set[str]:
        return self._open().metadata_fields()

    def get(self, chunk_ids: Sequence[str]) -> list[ChunkRecord | None]:
        return self._open().get(chunk_ids)

    def count(self) -> int:
        """Live chunks in the store (O(1)); :meth:`vector_count` counts the FAISS structure."""
        with self._lock, self._reading() as store:
            return store.count()

    def vector_count(self) -> int:
        """Live vectors in the FAISS structure, counted by FAISS (its size less masked ids), not
        by the store: equal to :meth:`count` when the two agree. O(1)."""
        with self._lock, self._reading():
            return self._live()

    def document_count(self) -> int:
        """Document rows in the store (documents whose registry shard this is). O(1)."""
        return self._open().document_count()

    def document_ids(self) -> set[str]:
        """Ids of the documents with a chunk here; scans every chunk (tools and tests only)."""
        return self._open().document_ids()

    def document_chunk_counts(self, document_ids: Sequence[str]) -> dict[str, int]:
        return self._open().document_chunk_counts(document_ids)

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        return self._open().get_document_rows(document_ids)

    def get_document_hashes(self, document_ids: Sequence[str]) -> dict[str, str]:
        return {d: row.content_hash for d, row in self.get_document_rows(document_ids).items()}

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        return self._open().get_document_versions(document_ids)

    def scan_chunks(self, after: str = "", limit: int = 1000) -> list[ChunkRecord]:
        return self._open().scan_chunks(after, limit)

    def scan_documents(self, after: str = "", limit: int = 1000) -> list[DocumentEntry]:
        return self._open().scan_documents(after, limit)

    def offsets(self) -> Offsets:
        return self._open().offsets()

    # -- persistence ----------------------------------------------------------------------

    def snapshot(self) -> None:
        """Writes the FAISS structure and a sidecar (store seq, offsets, checksum) atomically:
        a crash mid-way leaves either the old pair or a mismatch that restore detects. Raises
        :class:`RetryableError` if it cannot write (the store, and so every write, is unaffected)."""
        with self._lock:
            self._writable()
            store = self._fresh()  # never a stale structure under the store's current seq
            tmp, sidecar_tmp = self.path / "index.faiss.tmp", self.path / "index.json.tmp"
            try:
                faiss.write_index(self._index, str(tmp))
                _fsync(tmp)
                sidecar = {
                    "format": SNAPSHOT_FORMAT,
                    "model": store.model,
                    "dim": store.dim,
                    "config": {f: getattr(self._config, f) for f in _STRUCTURAL},
                    "seq": store.seq,
                    "offsets": store.offsets(),
                    "trained_on": self._trained_on,
                    "masked": self._masked.tolist(),
                    "blake2b": _digest(tmp),
                }
                sidecar_tmp.write_text(json.dumps(sidecar))
                _fsync(sidecar_tmp)
                os.replace(tmp, self.path / "index.faiss")
                os.replace(sidecar_tmp, self.path / "index.json")
                _fsync_dir(self.path)
            except (OSError, RuntimeError) as exc:  # faiss raises RuntimeError for I/O errors
                tmp.unlink(missing_ok=True)
                sidecar_tmp.unlink(missing_ok=True)
                raise RetryableError(f"shard {self.path}: snapshot failed: {exc}") from exc
            # Deletions up to the previous snapshot: a restore from either snapshot, and a reader
            # that caught up since the previous one, never need them.
            store.prune_tombstones(self._snapshot_seq)
            self._snapshot_seq = store.seq
            log.info("shard %s: snapshot at seq %d (%d vectors)", self.path, store.seq, self._index.ntotal)

    def restore(self) -> None:
        """(Re)loads the FAISS structure: snapshot + later store writes, else a full rebuild (a
        reader: as of one commit)."""
        with self._lock:
            store = self._open()
            with store.read_view() if self._reader else contextlib.nullcontext():
                seq = store.current_seq() if self._reader else store.seq
                try:
                    loaded = self._load_snapshot(store)
                except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # faiss: RuntimeError
                    log.warning("shard %s: snapshot unusable (%s); rebuilding from the store", self.path, exc)
                    loaded = False
                if not loaded:
                    self._rebuild()
                self._stale = False
                self._seq = seq

    def close(self) -> None:
        """Releases memory, the store and its writer lock. Idempotent; no snapshot is taken."""
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store, self._index = None, None

    # -- internals ------------------------------------------------------------------------

    def _open(self) -> ShardStore:
        if self._store is None:
            raise IndexUnavailableError(f"shard {self.path} is closed")
        return self._store

    def _writable(self) -> ShardStore:
        if self._reader:
            raise ConfigError(f"shard {self.path}: a reader cannot write or snapshot; its writer does")
        return self._open()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[ShardStore]:
        """The store, with the structure reflecting it for the block: the writer's after a rebuild
        if a mirroring left it stale (:meth:`_fresh`); a reader's inside one read view, caught up
        to the commit that view sees, so that the FAISS ids and the rows the block reads
        (filters, hits) belong to the same commit."""
        if not self._reader:
            yield self._fresh()
            return
        store = self._open()
        while True:
            with store.read_view():
                if self._follow_commits(store):
                    yield store
                    return
            self.restore()  # a snapshot forgot the deletions since our seq: start from it

    def _fresh(self) -> ShardStore:
        """The open store, after rebuilding the structure if a mirroring left it stale. Raises
        :class:`IndexUnavailableError` when the rebuild fails (it is tried again next time)."""
        store = self._open()
        if self._stale:
            try:
                self._rebuild()
            except Exception as exc:
                raise IndexUnavailableError(
                    f"shard {self.path}: the vector structure is behind the store and could not be "
                    f"rebuilt yet: {exc}"
                ) from exc
        return store

    def _follow_commits(self, store: ShardStore) -> bool:
        """Inside the caller's read view: takes the writes committed since the reader's seq up to
        the view's commit; False when the tombstones it needs were pruned (nothing was changed)."""
        seq = store.current_seq()
        if seq == self._seq and not self._stale:
            return True
        try:
            removed = store.removed_since(self._seq)
        except ValueError:
            return False
        try:
            if self._stale:
                self._rebuild()
            else:
                if self._config.kind == "hnsw":  # a row added and deleted since was never here
                    removed = removed[np.isin(removed, faiss.vector_to_array(self._index.id_map))]
                self._remove(removed)
                for ids, vectors in store.iter_vectors(after_seq=self._seq):
                    self._index.add_with_ids(vectors, ids)
                self._maybe_rebuild()
        except Exception as exc:
            self._stale = True
            raise IndexUnavailableError(
                f"shard {self.path}: the reader could not take the writes since seq {self._seq}: {exc}"
            ) from exc
        self._seq = seq
        return True

    def _live(self) -> int:
        return int(self._index.ntotal) - len(self._masked)

    def _is_exact(self) -> bool:
        return self._config.kind == "flat" or (self._config.kind == "ivf" and not self._trained_on)

    def _search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, exact: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each ``(n, k')``, of a FAISS search restricted to ``allowed`` ids (None:
        all live ones), exhaustive when ``exact``. Unfilled places hold id -1."""
        c, kind = self._config, self._config.kind
        if exact and kind == "hnsw":  # a graph cannot be searched exhaustively: score the vectors
            if allowed is None:
                allowed = np.setdiff1d(faiss.vector_to_array(self._index.id_map), self._masked)
            scores, positions = exact_top_k(queries, self._index.reconstruct_batch(allowed), k)
            return allowed[positions], scores
        selectors: list[Any] = []  # referenced until the search returns: FAISS does not own them
        if allowed is not None:
            selectors.append(faiss.IDSelectorBatch(allowed))
        elif len(self._masked):
            selectors.append(faiss.IDSelectorBatch(self._masked))
            selectors.append(faiss.IDSelectorNot(selectors[0]))
        sel = selectors[-1] if selectors else None
        if kind == "hnsw":  # efSearch below k would return fewer than k hits
            params = _faiss.SearchParametersHNSW(sel=sel, efSearch=max(c.hnsw_ef_search, k))
        elif not self._is_exact():  # probing every list makes IVF exhaustive
            params = _faiss.SearchParametersIVF(sel=sel, nprobe=c.ivf_nlist if exact else c.ivf_nprobe)
        else:  # a flat index skips unselected ids before computing their scores: exact and cheap
            params = _faiss.SearchParameters(sel=sel) if sel is not None else None
        scores, ids = self._index.search(queries, min(k, int(self._index.ntotal)), params=params)
        return ids, scores

    def _follow(self, changes: StoreChanges) -> None:
        """Brings the structure in line with a committed write: mirrors it, or rebuilds from the
        store when the structure is stale. A failure marks it stale and is logged, never raised:
        the write is durable, and the structure is rebuilt before it is next used."""
        try:
            if self._stale:
                self._rebuild()
            else:
                self._mirror(changes)
        except Exception:
            self._stale = True
            log.exception("shard %s: the vector structure missed a committed write; rebuilding", self.path)

    def _mirror(self, changes: StoreChanges) -> None:
        """Brings the FAISS structure in line with one store write."""
        self._remove(changes.removed_ids)
        if len(changes.added_ids):
            self._index.add_with_ids(changes.added_vectors, changes.added_ids)
        self._maybe_rebuild()

    def _remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self._config.kind == "hnsw":
            self._masked = np.union1d(self._masked, ids)
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def _maybe_rebuild(self) -> None:
        live, kind = self._live(), self._config.kind
        ivf_due = not self._trained_on or live > _IVF_RETRAIN_GROWTH * self._trained_on
        if (kind == "hnsw" and len(self._masked) > _HNSW_MAX_MASKED * self._index.ntotal) or (
            kind == "ivf" and ivf_due and live >= IVF_MIN_PER_LIST * self._config.ivf_nlist
        ):
            self._rebuild()

    def _rebuild(self) -> None:
        """A fresh structure from every live row of the store (trains IVF when there are enough)."""
        store = self._open()
        ids, vectors = _all_vectors(store)
        self._index, self._masked = build_structure(self._config, store.dim, vectors), ids[:0]
        self._trained_on = len(ids) if isinstance(self._index, faiss.IndexIVFFlat) else 0
        if len(ids):
            self._index.add_with_ids(vectors, ids)
        self._stale = False
        log.info("shard %s: rebuilt the %s structure from %d vectors", self.path, self._config.kind, len(ids))

    def _load_snapshot(self, store: ShardStore) -> bool:
        """Loads the snapshot and replays later store writes; False when there is none to use."""
        sidecar_path, index_path = self.path / "index.json", self.path / "index.faiss"
        if not sidecar_path.exists():
            return False
        sidecar = json.loads(sidecar_path.read_text())
        expected = {f: getattr(self._config, f) for f in _STRUCTURAL}
        if (sidecar["format"], sidecar["model"], sidecar["dim"], sidecar["config"]) != (
            SNAPSHOT_FORMAT,
            store.model,
            store.dim,
            expected,
        ) or sidecar["seq"] > store.seq:
            raise ValueError("it was made for another model, config or a newer store")
        data = index_path.read_bytes()  # once: hashed and loaded from the same bytes
        if _digest_bytes(data) != sidecar["blake2b"]:
            raise ValueError(f"{index_path.name} does not match its checksum")
        self._index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        self._masked = np.asarray(sidecar["masked"], dtype=np.int64)
        self._trained_on = int(sidecar["trained_on"])
        self._snapshot_seq = int(sidecar["seq"])
        removed = store.removed_since(sidecar["seq"])
        if self._config.kind == "hnsw":  # a row both added and deleted since was never in FAISS
            removed = removed[np.isin(removed, faiss.vector_to_array(self._index.id_map))]
        self._remove(removed)
        for ids, vectors in store.iter_vectors(after_seq=sidecar["seq"]):
            self._index.add_with_ids(vectors, ids)
        if self._live() != store.count():
            raise ValueError(f"it holds {self._live()} live vectors after replay, the store {store.count()}")
        self._maybe_rebuild()
        log.info("shard %s: restored the snapshot at seq %d", self.path, sidecar["seq"])
        return True


def build_structure(config: FaissConfig, dim: int, training: np.ndarray) -> Any:
    """An empty FAISS structure of ``config.kind`` for ``dim``-d inner-product vectors, as a shard
    builds it (the benchmarks build theirs here too). ``ivf`` trains on ``training`` when it holds
    at least ``IVF_MIN_PER_LIST * ivf_nlist`` rows, else it is an exact flat index. Vectors are
    added by the caller, with ``add_with_ids``."""
    c = config
    if c.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = c.hnsw_ef_construction, c.hnsw_ef_search
        return faiss.IndexIDMap2(hnsw)
    if c.kind == "ivf" and len(training) >= IVF_MIN_PER_LIST * c.ivf_nlist:
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, c.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
        step = max(1, len(training) // (256 * c.ivf_nlist))  # FAISS samples 256 per centroid
        ivf.train(np.ascontiguousarray(training[::step]))
        ivf.nprobe = c.ivf_nprobe
        return ivf
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _all_vectors(store: ShardStore) -> tuple[np.ndarray, np.ndarray]:
    batches = list(store.iter_vectors())
    if not batches:
        return np.zeros(0, np.int64), np.zeros((0, store.dim), np.float32)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _digest_bytes(data: bytes) -> str:
    """What :func:`_digest` gives for a file holding ``data``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
