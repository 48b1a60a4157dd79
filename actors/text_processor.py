"""TextProcessor: document envelopes → chunks → shard writes.

For each document's last change in a batch:

- an upsert is cleaned and cut into windows of the embedding model's tokens (:class:`Chunker`);
  when its content hash equals the stored one (and no write of it is in progress) nothing is
  embedded again, but its version is still written, so an older record of it can never land later;
- a delete (an envelope with ``op: delete``, or a tombstone) removes its chunks on every shard.

Writes, per :class:`~actors.processor.Writes`: phase 1 sends every shard the chunks routed to it
(``shard_of(chunk_id)``), each document's ``truncate`` (stale tail chunks of a shorter new version
go) or delete, and each document's version; phase 2 sends each document's registry row (content
hash, chunk count, the record it came from) to its registry shard, ``shard_of(document_id)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actors.chunker import ChunkedDocument, Chunker
from actors.processor import Change, Failure, Item, StoredDocument, Unit, Writes, deletion, two_phase_writes
from actors.vector_index import ChunkRecord, DocumentRow
from schemas.envelope import DocumentEnvelope
from schemas.settings import ChunkConfig


@dataclass(frozen=True)
class ChunkedUpsert:
    """The payload of a document upsert's unit: its envelope, its chunks, and whether the shards
    already hold exactly this content (nothing to embed then)."""

    envelope: DocumentEnvelope
    document: ChunkedDocument
    unchanged: bool


class TextProcessor:
    """The :class:`~actors.processor.Processor` of ``document`` envelopes."""

    kind = "document"

    def __init__(self, chunk: ChunkConfig, model: str) -> None:
        self.chunker = Chunker(chunk, model)

    def warm_up(self) -> None:
        self.chunker.warm_up()

    # PREPARE: chunk, skip unchanged
    def prepare(
        self, items: Sequence[Item], stored: Mapping[str, StoredDocument]
    ) -> tuple[list[Unit], list[tuple[Item, Failure]]]:
        units: list[Unit] = []
        failed: list[tuple[Item, Failure]] = []
        upserts = [item for item in items if not item.envelope.is_delete]
        chunked = self._chunk(upserts)
        for item in items:
            if item.envelope.is_delete:
                units.append(deletion(item))
                continue
            result = chunked[item.id]
            if isinstance(result, str):
                failed.append((item, result))
                continue
            current = stored.get(item.id)
            unchanged = current is not None and current.holds(result.content_hash)
            assert isinstance(item.envelope, DocumentEnvelope)  # the consumer routes by kind
            texts = [] if unchanged else [c.text for c in result.chunks]
            counts = {"unchanged": 1} if unchanged else {"documents": 1, "chunks": len(texts)}
            units.append(Unit(item, texts, ChunkedUpsert(item.envelope, result, unchanged), counts=counts))
        return units, failed

    def _chunk(self, items: Sequence[Item]) -> dict[str, ChunkedDocument | str]:
        """Each item's chunks, or the reason it cannot be chunked. One tokenizer call for the
        batch; when that fails, one call per document to find the ones that cannot be chunked."""
        envelopes = [item.envelope for item in items]
        assert all(isinstance(e, DocumentEnvelope) for e in envelopes)
        docs: list[DocumentEnvelope] = envelopes  # type: ignore[assignment]
        try:
            return {d.id: c for d, c in zip(docs, self.chunker.chunk_batch(docs), strict=True)}
        except Exception:  # found below, document by document
            pass
        out: dict[str, ChunkedDocument | str] = {}
        for doc in docs:
            try:
                out[doc.id] = self.chunker.chunk(doc)
            except ValueError as exc:
                out[doc.id] = f"chunking failed: {exc}"
            except Exception as exc:  # a tokenizer failing on this text will again: never retry it
                out[doc.id] = f"chunking failed: {type(exc).__name__}: {exc}"
        return out

    # WRITE: phase 1 on every shard, phase 2 on the registry shards
    def writes(self, units: Sequence[Unit], n_shards: int) -> Writes:
        return two_phase_writes([_change(unit) for unit in units], n_shards)


def _change(unit: Unit) -> Change:
    payload = unit.payload
    if isinstance(payload, Change):  # a deletion
        return payload
    doc, version = payload.document, unit.item.record.version
    records = [] if payload.unchanged else _records(payload, unit)
    return Change(doc.document_id, version, DocumentRow(doc.content_hash, len(doc.chunks), version), records)


def _records(payload: ChunkedUpsert, unit: Unit) -> list[ChunkRecord]:
    """The chunk records of an upsert, with their vectors (rows of ``unit.vectors`` in order)."""
    env, doc, vectors = payload.envelope, payload.document, unit.vectors
    if vectors is None or len(vectors) != len(doc.chunks):
        got = None if vectors is None else len(vectors)
        raise ValueError(f"document {doc.document_id!r}: {len(doc.chunks)} chunks but {got} vectors")
    return [
        ChunkRecord(
            c.chunk_id,
            doc.document_id,
            c.number,
            c.text,
            env.title,
            c.start,
            c.end,
            env.metadata,
            vectors[i],
            alignment=c.alignment,
        )
        for i, c in enumerate(doc.chunks)
    ]
