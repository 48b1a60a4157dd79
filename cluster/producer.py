"""`riverbed produce`: envelopes from files onto the documents and images topics, keyed by id.

Inputs:
- a ``.jsonl`` file: one JSON object per line, either a full envelope (it has ``kind``: a document
  or an image) or a plain document ``{"id" (or "_id"), "text", "title"?, "metadata"?}`` (BEIR
  corpus lines are such);
- a ``.txt`` / ``.md`` file, or a directory of them: one document per file, id = the path relative
  to the directory given, title = the first Markdown heading or the file name;
- an image file (``.png .jpg .jpeg .webp .gif``), or a directory of them: one image envelope per
  file with the bytes inline, id = the path relative to the directory given, caption = the text of
  the sidecar ``NAME.txt`` beside it when there is one (a sidecar is a caption, not a document).

Bad records are reported with their location and skipped; nothing is sent for them. Delivery is
acknowledged by every in-sync replica (``acks=all``) with the idempotent producer, so a retried
send is never duplicated; :meth:`EnvelopeProducer.flush` raises if any record was not delivered.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from schemas.envelope import DocumentEnvelope, ImageEnvelope, encode_envelope, validate_envelope
from schemas.errors import PoisonMessageError, RetryableError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown"}
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif"}
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@dataclass(frozen=True)
class SourceRecord:
    """One input record: an envelope, or the reason it cannot be one, with where it came from."""

    location: str
    envelope: DocumentEnvelope | ImageEnvelope | None = None
    error: str | None = None


def _from_json_line(obj: Any) -> DocumentEnvelope | ImageEnvelope:
    if isinstance(obj, dict) and "kind" not in obj:
        doc_id = obj.get("id", obj.get("_id"))
        obj = {
            "kind": "document",
            "id": doc_id,
            "title": obj.get("title") or None,
            "text": obj.get("text"),
            # a BEIR row's title is also a metadata field, so searches can filter on it
            "metadata": obj.get("metadata") or ({"title": obj["title"]} if obj.get("title") else {}),
        }
    return validate_envelope(obj)


def _read_jsonl(path: Path, label: str) -> Iterator[SourceRecord]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            location = f"{label}:{number}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield SourceRecord(location, error=f"not UTF-8: {exc}")
                continue
            except json.JSONDecodeError as exc:
                yield SourceRecord(location, error=f"invalid JSON: {exc}")
                continue
            try:
                yield SourceRecord(location, envelope=_from_json_line(obj))
            except PoisonMessageError as exc:
                yield SourceRecord(location, error=str(exc))


def _read_text_file(path: Path, doc_id: str) -> SourceRecord:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return SourceRecord(doc_id, error=f"not UTF-8: {exc}")
    fmt = TEXT_SUFFIXES[path.suffix.lower()]
    heading = _HEADING.search(text) if fmt == "markdown" else None
    title = heading.group(1) if heading else path.stem
    data = {
        "kind": "document",
        "id": doc_id,
        "title": title,
        "text": text,
        "metadata": {"format": fmt},
    }
    try:
        return SourceRecord(doc_id, envelope=validate_envelope(data))
    except PoisonMessageError as exc:
        return SourceRecord(doc_id, error=str(exc))


def _read_image_file(path: Path, image_id: str) -> SourceRecord:
    """An image envelope of ``path``'s bytes, its caption from the sidecar ``NAME.txt``. The bytes
    are not decoded here: the image path decodes them (and dead-letters what it cannot)."""
    sidecar = path.with_suffix(".txt")
    caption = None
    try:
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip() or None
    except UnicodeDecodeError as exc:
        return SourceRecord(image_id, error=f"caption {sidecar.name} is not UTF-8: {exc}")
    data = {
        "kind": "image",
        "id": image_id,
        "image_b64": base64.b64encode(path.read_bytes()).decode("ascii"),
        "caption": caption,
        "metadata": {"format": IMAGE_SUFFIXES[path.suffix.lower()], "file": path.name},
    }
    try:
        return SourceRecord(image_id, envelope=validate_envelope(data))
    except PoisonMessageError as exc:
        return SourceRecord(image_id, error=str(exc))


def _is_caption(file: Path) -> bool:
    """Whether ``file`` is the caption sidecar of an image beside it."""
    return file.suffix.lower() == ".txt" and any(
        file.with_suffix(suffix).is_file() or file.with_suffix(suffix.upper()).is_file()
        for suffix in IMAGE_SUFFIXES
    )


def read_records(path: Path) -> Iterator[SourceRecord]:
    """Every record under ``path`` in a stable order (files sorted by relative path)."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            suffix = file.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(file, rel)
            elif suffix in IMAGE_SUFFIXES:
                yield _read_image_file(file, rel)
            elif suffix in TEXT_SUFFIXES and not _is_caption(file):
                yield _read_text_file(file, rel)
    elif path.suffix.lower() in (".jsonl", ".json"):
        yield from _read_jsonl(path, path.name)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        yield _read_image_file(path, path.name)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        yield _read_text_file(path, path.name)
    elif path.exists():
        kinds = ", ".join([".jsonl", *TEXT_SUFFIXES, *IMAGE_SUFFIXES])
        raise ValueError(f"{path}: unsupported file type (use {kinds} or a directory)")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")


class EnvelopeProducer:
    """Sends envelopes keyed by id. Not thread safe; use one per thread."""

    def __init__(self, servers: str, max_record_bytes: int, client_id: str = "riverbed-producer") -> None:
        self.max_record_bytes = max_record_bytes
        self._producer = KafkaProducer(
            bootstrap_servers=servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=10,
            max_request_size=max_record_bytes + 64 * 1024,
        )
        self._pending: list[tuple[str, Any]] = []
        self.delivered: dict[tuple[str, int], int] = {}

    def send(self, topic: str, envelope: DocumentEnvelope | ImageEnvelope) -> None:
        key, value = encode_envelope(envelope)
        if len(value) > self.max_record_bytes:
            raise PoisonMessageError(
                "too_large",
                f"{envelope.id}: {len(value)} bytes, over kafka.max_record_bytes={self.max_record_bytes}",
            )
        self._pending.append((envelope.id, self._producer.send(topic, key=key, value=value)))

    @property
    def pending(self) -> int:
        """Sends not yet confirmed by :meth:`flush`."""
        return len(self._pending)

    def send_tombstone(self, topic: str, document_id: str) -> None:
        """A null value under the id's key: consumers delete the document."""
        self._pending.append(
            (document_id, self._producer.send(topic, key=document_id.encode("utf-8"), value=None))
        )

    def flush(self, timeout_s: float = 60.0) -> list[tuple[str, int, int]]:
        """Waits for every pending send; returns (id, partition, offset) of each, in send order."""
        self._producer.flush(timeout=timeout_s)
        results = []
        try:
            for doc_id, future in self._pending:
                meta = future.get(timeout=timeout_s)
                results.append((doc_id, meta.partition, meta.offset))
                tp = (meta.topic, meta.partition)
                self.delivered[tp] = max(self.delivered.get(tp, -1), meta.offset)
        except KafkaError as exc:
            raise RetryableError(f"sending {doc_id} failed: {exc}") from exc
        finally:
            self._pending.clear()
        return results

    def close(self) -> None:
        self._producer.close()


def produce_all(
    servers: str, topic: str, envelopes: Iterable[DocumentEnvelope | ImageEnvelope], max_record_bytes: int
) -> int:
    """Sends every envelope to ``topic`` keyed by id and waits until all are acknowledged;
    returns how many were sent."""
    producer = EnvelopeProducer(servers, max_record_bytes)
    try:
        sent = 0
        for envelope in envelopes:
            producer.send(topic, envelope)
            sent += 1
        producer.flush()
        return sent
    finally:
        producer.close()
