"""ImageProcessor: image envelopes → one record per image → shard writes.

For each image's last change in a batch:

- an upsert's encoded bytes are read (``image_b64``, or its ``uri``: a file under
  ``images.uri_roots``, or http(s); see :mod:`actors.image_decode`) and its content hash taken
  (:func:`content_hash`). When the hash equals the stored one (and no write of it is in progress)
  the image is neither decoded nor embedded again, but its version is still written, so an older
  record of it can never land later. Otherwise it is decoded, its thumbnail made, and its one
  input to embed is its RGB pixels with the longest side cut to :data:`MAX_INPUT_SIDE` (a
  ``numpy.uint8`` array of shape ``(height, width, 3)``: cheap to send to an embedder actor, which
  makes an image of it again; the model resizes to its own input anyway);
- an image that cannot be read, decoded or is refused (size, pixels, format, a path outside the
  roots) is dead-lettered as ``invalid_image`` with what is wrong; any other failure as
  ``processing_error``;
- a delete (``op: delete``, or a tombstone) removes its record on every shard.

Stored form: an image is ONE chunk record, ``<image id>#0`` (document id: the image id; number 0):
its ``text`` is the caption or ``""`` (keyword search runs over captions), no title, span
``[0, len(text))``, the envelope's metadata plus :data:`~schemas.envelope.IMAGE_THUMBNAIL_KEY` (a
base64 JPEG whose longest side is ``images.thumbnail_size``) and, for an image sent by uri,
:data:`~schemas.envelope.IMAGE_URI_KEY` (the uri as sent), and the image model's vector. Its
registry row is (content hash, 1 chunk, version), as a document's; the writes come in the same two
phases (:func:`actors.processor.two_phase_writes`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from actors.image_decode import ImageLimits, InvalidImageError, decode, image_bytes, thumbnail
from actors.processor import Change, Failure, Item, StoredDocument, Unit, Writes, deletion, two_phase_writes
from actors.vector_index import ChunkRecord, DocumentRow
from schemas.envelope import IMAGE_THUMBNAIL_KEY, IMAGE_URI_KEY, ImageEnvelope
from schemas.ids import chunk_id
from schemas.metadata import MetadataValue
from schemas.settings import ImagesConfig

READERS = 8
"""Images of a batch read at once (their files, their http fetches); decoding is one at a time."""
MAX_INPUT_SIDE = 512
"""The longest side, in pixels, of an image as sent to the embedder (never enlarged)."""
IMAGE_PROCESSOR_VERSION = 2  # 2: thumbnails at most THUMBNAIL_MAX_BYTES
"""Part of every content hash: raise it when what is stored of an image changes for the same
envelope (another thumbnail, another input size), so that re-delivered images are written again."""


@dataclass(frozen=True)
class _Upsert:
    envelope: ImageEnvelope
    content_hash: str
    thumbnail_b64: str | None
    """None when unchanged (nothing decoded, nothing written but the version and the row)."""


class ImageProcessor:
    """The :class:`~actors.processor.Processor` of ``image`` envelopes. Reads files and fetches
    http(s) uris in :meth:`prepare`, :data:`READERS` at a time, and decodes in the caller's
    thread."""

    kind = "image"

    def __init__(self, config: ImagesConfig) -> None:
        self.limits = ImageLimits(
            roots=config.uri_roots,
            allow_http=config.allow_http,
            max_bytes=config.max_bytes,
            max_pixels=config.max_pixels,
            fetch_timeout_s=config.fetch_timeout_s,
        )
        self.thumbnail_size = config.thumbnail_size

    def warm_up(self) -> None:
        """Nothing to load: Pillow decodes, the embedder holds the model."""

    # PREPARE: read, skip unchanged, decode, thumbnail, downscale
    def prepare(
        self, items: Sequence[Item], stored: Mapping[str, StoredDocument]
    ) -> tuple[list[Unit], list[tuple[Item, Failure]]]:
        """Reads :data:`READERS` images at a time (files and fetches wait on I/O, not on each
        other), then decodes them one by one (one decoded image in memory at a time)."""
        units: list[Unit] = []
        failed: list[tuple[Item, Failure]] = []
        with ThreadPoolExecutor(READERS, thread_name_prefix="image-read") as pool:
            for start in range(0, len(items), READERS):
                window = items[start : start + READERS]
                reads = [None if i.envelope.is_delete else pool.submit(self._read, i) for i in window]
                for item, read in zip(window, reads, strict=True):
                    if read is None:
                        units.append(deletion(item))
                        continue
                    try:
                        units.append(self._upsert(item, read.result(), stored.get(item.id)))
                    except InvalidImageError as exc:
                        failed.append((item, exc))
                    except Exception as exc:  # unforeseen, but tied to this image: the rest goes on
                        failed.append((item, f"preparing the image failed: {type(exc).__name__}: {exc}"))
        return units, failed

    def _read(self, item: Item) -> bytes:
        envelope = item.envelope
        assert isinstance(envelope, ImageEnvelope)  # the consumer routes by kind
        return image_bytes(envelope.image_b64, envelope.uri, self.limits)

    def _upsert(self, item: Item, data: bytes, current: StoredDocument | None) -> Unit:
        envelope = item.envelope
        assert isinstance(envelope, ImageEnvelope)
        digest = content_hash(hashlib.sha256(data).hexdigest(), envelope, self.thumbnail_size)
        if current is not None and current.holds(digest):
            return Unit(item, [], _Upsert(envelope, digest, None), counts={"unchanged": 1})
        decoded = decode(data, self.limits)
        small = base64.b64encode(thumbnail(decoded.image, self.thumbnail_size)).decode("ascii")
        pixels = model_input(decoded.image)
        return Unit(item, [pixels], _Upsert(envelope, digest, small), counts={"images": 1})

    # WRITE: phase 1 on every shard, phase 2 on the registry shards
    def writes(self, units: Sequence[Unit], n_shards: int) -> Writes:
        return two_phase_writes([_change(unit) for unit in units], n_shards)


def content_hash(image_sha256: str, envelope: ImageEnvelope, thumbnail_size: int) -> str:
    """sha256 (hex) of all the stored record depends on: the encoded image's sha256, the caption
    (None counts as ``""``), the metadata, the uri (None when inline), the thumbnail size and
    :data:`IMAGE_PROCESSOR_VERSION`, as canonical JSON (sorted keys, no spaces). The same image
    sent again is unchanged; a new caption, metadata or uri is a change."""
    payload = {
        "processor": IMAGE_PROCESSOR_VERSION,
        "image_sha256": image_sha256,
        "caption": envelope.caption or "",
        "metadata": envelope.metadata,
        "uri": envelope.uri,
        "thumbnail_size": thumbnail_size,
    }
    data = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def model_input(image: Image.Image, max_side: int = MAX_INPUT_SIDE) -> np.ndarray:
    """``image`` (RGB) as a ``uint8`` array ``(height, width, 3)``, shrunk (aspect kept, each side
    at least 1) so that its longest side is at most ``max_side``; a smaller image keeps its size."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def _change(unit: Unit) -> Change:
    payload = unit.payload
    if isinstance(payload, Change):  # a deletion
        return payload
    envelope, version = payload.envelope, unit.item.record.version
    thumb = payload.thumbnail_b64
    records = [] if thumb is None else [_record(envelope, thumb, unit.vectors)]
    return Change(envelope.id, version, DocumentRow(payload.content_hash, 1, version), records)


def _record(envelope: ImageEnvelope, thumbnail_b64: str, vectors: np.ndarray | None) -> ChunkRecord:
    """The image's one record, with its vector (``vectors`` must be exactly one row)."""
    if vectors is None or len(vectors) != 1:
        got = None if vectors is None else len(vectors)
        raise ValueError(f"image {envelope.id!r}: 1 input but {got} vectors")
    metadata: dict[str, MetadataValue] = dict(envelope.metadata)
    if envelope.uri is not None:
        metadata[IMAGE_URI_KEY] = envelope.uri
    metadata[IMAGE_THUMBNAIL_KEY] = thumbnail_b64
    text = envelope.caption or ""
    # alignment "": the text is the caption as sent, position i at i
    return ChunkRecord(
        chunk_id(envelope.id, 0), envelope.id, 0, text, None, 0, len(text), metadata, vectors[0], alignment=""
    )
