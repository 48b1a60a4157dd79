"""GraphProcessor: document envelopes → chunks → the knowledge graph's shard writes.

The graph reads the documents topic in a consumer group of its own, through the text path's own
chunking (:class:`~actors.text_processor.TextProcessor`: the same chunks, so the same chunk ids,
and the same "unchanged content" skip against the graph shards' registry rows). What its
downstream "embeds" is extraction: the extractor actors return one
:class:`~actors.graph_extract.Facts` per chunk text. From them each document's graph is made
(:func:`~actors.graph_extract.document_graph`: spans in the document, aliases, the title).

Writes, per :class:`~actors.processor.Writes`: phase 1 sends every graph shard its part of every
chunk of each upserted document (:func:`~actors.graph_extract.for_shard`, empty when none of the
chunk's entities lives there: the upsert then clears what the chunk had there before), each
document's ``truncate`` (its chunks past the new count lose their facts) or delete, and its version;
phase 2 sends each document's registry row to ``shard_of(document_id)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from actors.graph_extract import ChunkGraph, Facts, document_graph, for_shard
from actors.processor import Change, Failure, Item, StoredDocument, Unit, Writes, two_phase_writes
from actors.text_processor import ChunkedUpsert, TextProcessor
from actors.vector_index import DocumentRow
from schemas.settings import ChunkConfig


class GraphProcessor:
    """The :class:`~actors.processor.Processor` of ``document`` envelopes for the knowledge graph."""

    kind = "document"

    def __init__(self, chunk: ChunkConfig, model: str) -> None:
        self.text = TextProcessor(chunk, model)

    def warm_up(self) -> None:
        self.text.warm_up()

    def prepare(
        self, items: Sequence[Item], stored: Mapping[str, StoredDocument]
    ) -> tuple[list[Unit], list[tuple[Item, Failure]]]:
        """The text path's units: each changed document's chunk texts are the inputs."""
        return self.text.prepare(items, stored)

    def writes(self, units: Sequence[Unit], n_shards: int) -> Writes:
        return two_phase_writes([_change(unit) for unit in units], n_shards, route=_every_shard)


def _every_shard(record: ChunkGraph, n_shards: int) -> Iterable[tuple[int, Any]]:
    return [(i, for_shard(record, i, n_shards)) for i in range(n_shards)]


def _change(unit: Unit) -> Change:
    payload = unit.payload
    if isinstance(payload, Change):  # a deletion
        return payload
    assert isinstance(payload, ChunkedUpsert)
    doc, version = payload.document, unit.item.record.version
    row = DocumentRow(doc.content_hash, len(doc.chunks), version)
    if payload.unchanged:
        return Change(doc.document_id, version, row)
    facts = unit.vectors
    if facts is None or len(facts) != len(doc.chunks) or not all(isinstance(f, Facts) for f in facts):
        got = None if facts is None else len(facts)
        raise ValueError(f"document {doc.document_id!r}: {len(doc.chunks)} chunks but {got} extractions")
    graphs = document_graph(doc.document_id, payload.envelope.title, doc.chunks, list(facts))
    unit.counts["mentions"] = sum(len(g.mentions) for g in graphs)
    unit.counts["relations"] = sum(len(g.relations) for g in graphs)
    return Change(doc.document_id, version, row, graphs)
