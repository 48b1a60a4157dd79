"""GraphStore: one knowledge-graph shard, a SQLite store (the truth) and the NetworkX view of it.

The store holds, per chunk, what :mod:`actors.graph_extract` found in it (the part of it routed to
this shard: :func:`~actors.graph_extract.for_shard`): its mentions (entity key, name as written,
label, span, sentence span) and its relations (source, target, label, sentence span). Writes are
:class:`~actors.vector_index.ShardWrite` of :class:`~actors.graph_extract.ChunkGraph` records, with
the vector shards' semantics, in one transaction each:

1. ``truncate``: a document's chunks numbered ``keep`` and up lose all their facts;
2. ``delete_documents``: every fact of the document and its row go;
3. ``delete_chunks``: these chunks' facts go;
4. ``upserts``: each chunk's facts are replaced by the record's (equal facts: nothing changes);
5. ``documents``: registry rows (content hash, chunk count, source record);
6. ``offsets``: max-merged.

Versions as in the vector shards: a document's parts apply only when its version is not older
than the stored one (:func:`schemas.topology.is_older`), and the version is stored, deletes too.
So an update replaces exactly the document's facts, a delete removes them, a re-delivery changes
nothing, and an older record arriving late is refused.

The view (:attr:`GraphStore.graph`) is a ``networkx.MultiDiGraph`` built from the store on open
and changed with each write once it is durable (as FAISS is derived from a vector shard's store):

- a node per entity key with ``names`` and ``labels`` (Counters over its mentions here),
  ``chunks`` (a Counter of the chunks mentioning it here) and ``titled`` (the chunks of the
  documents it is the title of);
- an edge per ``(source, target, label)`` (the label is the edge key) with ``evidence``, a
  Counter of ``(chunk_id, sentence start, sentence end)``.

An entity or edge whose last supporting fact goes disappears. A node without mentions here exists
while an edge of this shard touches it (its entity lives on another shard).

Thread-safety: one lock serialises writes and reads of the view; readers get copies.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import networkx as nx

from actors import graph_query, store_schema
from actors.graph_extract import TITLE, ChunkGraph, Mention, Relation, entity_key
from actors.shard_identity import read_only
from actors.sqlite_store import SQLiteStore
from actors.store_write import (
    MERGE_OFFSET,
    RECORD_VERSION,
    UPSERT_DOCUMENT,
    batches,
    marks,
    read_document_rows,
    read_versions,
)
from actors.vector_index import DocumentRow, ShardWrite, WriteResult
from schemas.errors import ConfigError, IndexUnavailableError
from schemas.ids import split_chunk_id
from schemas.topology import Version, is_older

DB_NAME = "graph.sqlite"
GRAPH_SCHEMA_VERSION = 1
_TABLES = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- the chunks with facts on this shard (an upsert of a chunk with no facts here leaves none)
CREATE TABLE IF NOT EXISTS chunks (chunk_id TEXT PRIMARY KEY, document_id TEXT NOT NULL,
    number INTEGER NOT NULL, source_topic TEXT, source_partition INTEGER, source_offset INTEGER);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks (document_id, number);
CREATE TABLE IF NOT EXISTS mentions (chunk_id TEXT NOT NULL, entity TEXT NOT NULL,
    name TEXT NOT NULL, label TEXT NOT NULL, span_start INTEGER NOT NULL, span_end INTEGER NOT NULL,
    sentence_start INTEGER NOT NULL, sentence_end INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS mentions_chunk ON mentions (chunk_id);
CREATE INDEX IF NOT EXISTS mentions_entity ON mentions (entity);
CREATE TABLE IF NOT EXISTS relations (chunk_id TEXT NOT NULL, source TEXT NOT NULL,
    target TEXT NOT NULL, label TEXT NOT NULL,
    sentence_start INTEGER NOT NULL, sentence_end INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS relations_chunk ON relations (chunk_id);
{store_schema.BOOKKEEPING}
"""
_MENTION_COLUMNS = "entity, name, label, span_start, span_end, sentence_start, sentence_end"
_RELATION_COLUMNS = "source, target, label, sentence_start, sentence_end"


def recorded_graph_model(directory: Path) -> str | None:
    """The extraction model the graph store in ``directory`` was written by, read without loading
    the store; None when there is none."""
    with read_only(directory / DB_NAME) as conn:
        if conn is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        return str(row[0]) if row else ""


def stored_counts(directory: Path) -> dict[str, int] | None:
    """Row counts of the graph store in ``directory`` (``documents``: registry rows, ``chunks``
    with facts here, ``mentions``, ``relations``), read without loading the store or taking its
    lock; None when there is none. O(1) in SQLite's terms: a count per table."""
    with read_only(directory / DB_NAME) as conn:
        if conn is None:
            return None
        tables = ("documents", "chunks", "mentions", "relations")
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}


class GraphStore(SQLiteStore):
    """The SQLite store of one graph shard directory, written by the extraction of ``model`` (a
    spaCy pipeline's name and version, and the extraction's version: another model is another
    graph). Opening creates it, or loads it and builds the view. ConfigError when it was written
    by another model; IndexUnavailableError when the file is no usable database; RetryableError
    when another process holds it."""

    def __init__(self, directory: Path, model: str, *, _read_only: bool = False) -> None:
        super().__init__(f"graph shard {directory}")
        self.directory = directory
        self._facts: dict[str, ChunkGraph] = {}
        self._graph = nx.MultiDiGraph()
        self._aliases: dict[str, Counter[str]] = {}  # the key of a name as written -> entity keys
        with self._opening():
            self.model = self._open_read_only() if _read_only else self._open(model)
            self._load()

    @classmethod
    def read_only(cls, directory: Path) -> GraphStore:
        """Opens an existing graph shard for reading, whatever its model; no lock (a running shard
        actor may hold it), writes refused. IndexUnavailableError when there is none."""
        return cls(directory, "", _read_only=True)

    # WRITE

    def apply(self, write: ShardWrite[ChunkGraph]) -> WriteResult:
        """Applies ``write`` in one transaction (see the module docstring), durable on return, then
        changes the view. Raises ProcessingError for data SQLite refuses, StorageFullError,
        RetryableError when SQLite cannot write now; nothing is written then."""
        with self._lock:
            with self._transaction() as cur:
                stored = read_versions(cur, list(write.versions))
                stale = {d for d, v in write.versions.items() if is_older(v, stored.get(d))}
                step = _GraphWrite(cur, self._facts, write.versions, stale)
                step.run(write)
            for chunk_id in step.removed:
                self._unview(self._facts.pop(chunk_id))
            for graph in step.added:
                self._facts[graph.chunk_id] = graph
                self._view(graph)
            return WriteResult(
                upserted=step.upserted, unchanged=step.unchanged, deleted=step.deleted, stale=len(stale)
            )

    # READ

    @property
    def graph(self) -> nx.MultiDiGraph:
        """The view itself (not a copy): read it under :meth:`reading`."""
        return self._graph

    @contextmanager
    def reading(self) -> Iterator[nx.MultiDiGraph]:
        """The view, with writes held off while the caller reads it."""
        with self._lock:
            yield self._graph

    def mentions(self, entities: Sequence[str], limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """Each entity's mentions here, in document order: ``chunk_id``, ``document_id``,
        ``name``, ``label``, ``span``, ``sentence`` (at most ``limit`` per entity)."""
        out: dict[str, list[dict[str, Any]]] = {e: [] for e in entities}
        with self._lock:
            for batch in batches(list(entities)):
                sql = (
                    f"SELECT m.chunk_id, c.document_id, {_MENTION_COLUMNS} FROM mentions m"
                    f" JOIN chunks c USING (chunk_id) WHERE entity IN ({marks(len(batch))})"
                    " ORDER BY c.document_id, c.number, m.span_start"
                )
                for chunk_id, doc, entity, name, label, s0, s1, t0, t1 in self._conn.execute(sql, batch):
                    found = out[entity]
                    if limit is None or len(found) < limit:
                        span, sentence = [s0, s1], [t0, t1]
                        found.append(
                            dict(
                                chunk_id=chunk_id,
                                document_id=doc,
                                name=name,
                                label=label,
                                span=span,
                                sentence=sentence,
                            )
                        )
        return out

    def around(self, keys: Sequence[str]) -> nx.MultiDiGraph:
        """These entities, every edge of this shard touching one, and the entities at their other
        ends (:func:`actors.graph_query.around`): one hop of a query."""
        with self._lock:
            return graph_query.around(self._graph, keys)

    def describe(self, keys: Sequence[str]) -> nx.MultiDiGraph:
        """These entities' nodes, without edges (:func:`actors.graph_query.describe`)."""
        with self._lock:
            return graph_query.describe(self._graph, keys)

    def known(self, candidates: Sequence[str]) -> dict[str, str]:
        """``{candidate: entity key}`` for the candidates that are the key of an entity mentioned
        here, or else the key of a name one of them is written as here (the most frequent)."""
        out: dict[str, str] = {}
        with self._lock:
            for candidate in candidates:
                chunks = self._graph.nodes[candidate]["chunks"] if candidate in self._graph else None
                if chunks:
                    out[candidate] = candidate
                elif candidate in self._aliases:
                    counts = self._aliases[candidate]
                    out[candidate] = min(counts, key=lambda k: (-counts[k], k))
        return out

    def search(self, prefix: str, limit: int) -> list[dict[str, Any]]:
        """:func:`actors.graph_query.search_entities` over the entities mentioned here."""
        with self._lock:
            return graph_query.search_entities(self._graph, prefix, limit)

    def chunk_ids(self) -> list[str]:
        """The chunks with facts here, sorted."""
        with self._lock:
            return sorted(self._facts)

    def chunk_graphs(self, chunk_ids: Sequence[str]) -> list[ChunkGraph | None]:
        """What this shard holds of each chunk (None: nothing)."""
        with self._lock:
            return [self._facts.get(c) for c in chunk_ids]

    def get_document_rows(self, document_ids: Sequence[str]) -> dict[str, DocumentRow]:
        with self._lock:
            return read_document_rows(self._conn.cursor(), list(document_ids))

    def get_document_versions(self, document_ids: Sequence[str]) -> dict[str, Version]:
        with self._lock:
            return read_versions(self._conn.cursor(), list(document_ids))

    def document_count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def stats(self) -> dict[str, int]:
        """``entities`` (with a mention here), ``edges`` (distinct source, target, label),
        ``mentions``, ``relations`` (fact rows), ``chunks`` (with facts here), ``documents``."""
        with self._lock:
            count = {t: int(self._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
                     for t in ("mentions", "relations", "chunks", "documents")}  # fmt: skip
            entities = sum(1 for _, chunks in self._graph.nodes(data="chunks") if chunks)
            return {"entities": entities, "edges": self._graph.number_of_edges(), **count}

    # VIEW

    def _view(self, graph: ChunkGraph) -> None:
        g = self._graph
        for m in graph.mentions:
            if m.key not in g:
                g.add_node(m.key, names=Counter(), labels=Counter(), chunks=Counter(), titled=Counter())
            node = g.nodes[m.key]
            node["names"][m.name] += 1
            alias = entity_key(m.name)
            if alias != m.key:
                self._aliases.setdefault(alias, Counter())[m.key] += 1
            node["labels"][m.label] += 1
            node["chunks"][graph.chunk_id] += 1
            if m.label == TITLE:
                node["titled"][graph.chunk_id] += 1
        for r in graph.relations:
            for key in (r.source, r.target):
                if key not in g:
                    g.add_node(key, names=Counter(), labels=Counter(), chunks=Counter(), titled=Counter())
            if not g.has_edge(r.source, r.target, r.label):
                g.add_edge(r.source, r.target, key=r.label, evidence=Counter())
            g.edges[r.source, r.target, r.label]["evidence"][(graph.chunk_id, *r.sentence)] += 1

    def _unview(self, graph: ChunkGraph) -> None:
        g = self._graph
        touched: set[str] = set()
        for m in graph.mentions:
            node = g.nodes[m.key]
            _take(node["names"], m.name)
            alias = entity_key(m.name)
            if alias != m.key:
                _take(self._aliases[alias], m.key)
                if not self._aliases[alias]:
                    del self._aliases[alias]
            _take(node["labels"], m.label)
            _take(node["chunks"], graph.chunk_id)
            if m.label == TITLE:
                _take(node["titled"], graph.chunk_id)
            touched.add(m.key)
        for r in graph.relations:
            evidence = g.edges[r.source, r.target, r.label]["evidence"]
            _take(evidence, (graph.chunk_id, *r.sentence))
            if not evidence:
                g.remove_edge(r.source, r.target, key=r.label)
            touched.update((r.source, r.target))
        for key in touched:
            if key in g and not g.nodes[key]["chunks"] and g.degree(key) == 0:
                g.remove_node(key)

    # OPEN

    def _open_read_only(self) -> str:
        path = self.directory / DB_NAME
        if not path.is_file():
            raise IndexUnavailableError(f"{self._where} holds no graph ({DB_NAME} is not there)")
        self._conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 10000")
        return dict(self._conn.execute("SELECT key, value FROM meta").fetchall()).get("model", "")

    def _open(self, model: str) -> str:
        self._connect(self.directory, DB_NAME)
        with self._transaction() as cur:
            for statement in _TABLES.split(";"):  # executescript would commit the transaction
                if statement.strip():
                    cur.execute(statement)
            meta = dict(cur.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                values = {"model": model, "schema_version": str(GRAPH_SCHEMA_VERSION)}
                cur.executemany("INSERT INTO meta VALUES (?, ?)", list(values.items()))
                return model
        if meta.get("model") != model:
            raise ConfigError(
                f"{self._where} was built by {meta.get('model')!r}, not {model!r}: another extraction "
                "model means another graph (`riverbed graph reset`, then ingest again, rebuilds it from "
                "the topic)"
            )
        if int(meta.get("schema_version", "0")) > GRAPH_SCHEMA_VERSION:
            raise ConfigError(
                f"{self._where} has schema {meta['schema_version']}, written by a newer riverbed; this "
                f"one reads schema {GRAPH_SCHEMA_VERSION}"
            )
        return model

    def _load(self) -> None:
        mentions: dict[str, list[Mention]] = {}
        relations: dict[str, list[Relation]] = {}
        for chunk_id, key, name, label, s0, s1, t0, t1 in self._conn.execute(
            f"SELECT chunk_id, {_MENTION_COLUMNS} FROM mentions ORDER BY rowid"
        ):
            mentions.setdefault(chunk_id, []).append(Mention(key, name, label, s0, s1, (t0, t1)))
        for chunk_id, source, target, label, t0, t1 in self._conn.execute(
            f"SELECT chunk_id, {_RELATION_COLUMNS} FROM relations ORDER BY rowid"
        ):
            relations.setdefault(chunk_id, []).append(Relation(source, target, label, (t0, t1)))
        for chunk_id, document_id, number in self._conn.execute(
            "SELECT chunk_id, document_id, number FROM chunks"
        ):
            graph = ChunkGraph(
                chunk_id,
                document_id,
                number,
                tuple(mentions.get(chunk_id, ())),
                tuple(relations.get(chunk_id, ())),
            )
            self._facts[chunk_id] = graph
            self._view(graph)


class _GraphWrite:
    """The steps of one write inside its transaction, and what they change of the view:
    ``removed`` chunk ids (their old facts leave the view), ``added`` graphs (enter it)."""

    def __init__(
        self,
        cur: sqlite3.Cursor,
        facts: Mapping[str, ChunkGraph],
        versions: Mapping[str, Version],
        stale: set[str],
    ) -> None:
        self.cur, self.facts, self.versions, self.stale = cur, facts, versions, stale
        self.removed: list[str] = []
        self.added: list[ChunkGraph] = []
        self.upserted = 0
        self.unchanged = 0
        self.deleted = 0

    def run(self, write: ShardWrite[ChunkGraph]) -> None:
        for document_id, keep in write.truncate.items():
            if document_id not in self.stale:
                self._drop("document_id = ? AND number >= ?", [document_id, keep])
        for document_id in write.delete_documents:
            if document_id not in self.stale:
                self._drop("document_id = ?", [document_id])
                self.cur.execute("DELETE FROM documents WHERE document_id = ?", (document_id,))
        for batch in batches([c for c in write.delete_chunks if not self._stale_chunk(c)]):
            self._drop(f"chunk_id IN ({marks(len(batch))})", batch)
        for graph in write.unique_upserts():
            if graph.document_id not in self.stale:
                self._upsert(graph)
        for document_id, row in write.documents.items():
            if document_id not in self.stale:
                values = (document_id, row.content_hash, row.n_chunks, 0, *(row.source or (None,) * 3))
                self.cur.execute(UPSERT_DOCUMENT, values)
        for document_id, version in self.versions.items():
            if document_id not in self.stale:
                self.cur.execute(RECORD_VERSION, (document_id, *version))
        for topic, positions in write.offsets.items():
            self.cur.executemany(MERGE_OFFSET, [(topic, int(p), int(o)) for p, o in positions.items()])

    def _upsert(self, graph: ChunkGraph) -> None:
        version = self.versions.get(graph.document_id)
        source = tuple(version) if version is not None else (None, None, None)
        old = self._current(graph.chunk_id)
        if old == graph or (old is None and not graph.mentions and not graph.relations):
            self.unchanged += 1
            if old is not None:  # the same facts from another record: only its source changes
                self.cur.execute(
                    "UPDATE chunks SET source_topic = ?, source_partition = ?, source_offset = ?"
                    " WHERE chunk_id = ?",
                    (*source, graph.chunk_id),
                )
            return
        self.upserted += 1
        if old is not None:
            self._drop("chunk_id = ?", [graph.chunk_id], counted=False)
        if not graph.mentions and not graph.relations:
            return  # nothing of the chunk lives here now
        self.cur.execute(
            "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
            (graph.chunk_id, graph.document_id, graph.number, *source),
        )
        self.cur.executemany(
            f"INSERT INTO mentions (chunk_id, {_MENTION_COLUMNS}) VALUES ({marks(8)})",
            [(graph.chunk_id, m.key, m.name, m.label, m.start, m.end, *m.sentence) for m in graph.mentions],
        )
        self.cur.executemany(
            f"INSERT INTO relations (chunk_id, {_RELATION_COLUMNS}) VALUES ({marks(6)})",
            [(graph.chunk_id, r.source, r.target, r.label, *r.sentence) for r in graph.relations],
        )
        self.added.append(graph)

    def _current(self, chunk_id: str) -> ChunkGraph | None:
        """The chunk's facts as they stand in this write (an earlier step may have dropped them)."""
        if chunk_id in self.removed:
            return None
        return self.facts.get(chunk_id)

    def _drop(self, where: str, params: Sequence[object], *, counted: bool = True) -> None:
        ids = [r[0] for r in self.cur.execute(f"SELECT chunk_id FROM chunks WHERE {where}", params)]
        for batch in batches(ids):
            for table in ("mentions", "relations", "chunks"):
                self.cur.execute(f"DELETE FROM {table} WHERE chunk_id IN ({marks(len(batch))})", batch)
        fresh = [c for c in ids if c not in self.removed]
        self.removed += fresh
        if counted:
            self.deleted += len(fresh)

    def _stale_chunk(self, chunk_id: str) -> bool:
        return split_chunk_id(chunk_id)[0] in self.stale


def _take(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
