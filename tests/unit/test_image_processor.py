"""ImageProcessor on real PNG and JPEG bytes (and easy-vqa's files): what each image becomes (one
pixel array to embed), every refusal, deletes, the unchanged skip, and the two phases of writes."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import actors.image_processor as image_processor
from actors.image_decode import InvalidImageError
from actors.image_processor import MAX_INPUT_SIDE, READERS, ImageProcessor, content_hash, model_input
from actors.models import packaged_dataset_dir
from actors.processor import Item, Record, StoredDocument, Unit
from actors.vector_index import ChunkRecord, DocumentRow
from schemas.envelope import IMAGE_THUMBNAIL_KEY, IMAGE_URI_KEY, ImageEnvelope, decode_record
from schemas.ids import shard_of
from schemas.settings import ImagesConfig
from tests.unit.local_http import QuietHandler, serving

TOPIC = "riverbed.images"
THUMB = 32


def encoded(
    fmt: str = "PNG", size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (255, 0, 0)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def item(offset: int = 0, partition: int = 0, image_id: str = "img-1", **fields: object) -> Item:
    envelope = ImageEnvelope.model_validate({"kind": "image", "id": image_id, **fields})
    return Item(Record(TOPIC, partition, offset, envelope.id.encode(), b"{}"), envelope)


def processor(*roots: Path) -> ImageProcessor:
    return ImageProcessor(ImagesConfig(uri_roots=roots, thumbnail_size=THUMB, allow_http=False))


def prepared(
    proc: ImageProcessor, *items: Item, stored: dict[str, StoredDocument] | None = None
) -> list[Unit]:
    units, failed = proc.prepare(list(items), stored or {})
    assert not failed, failed
    return units


def embedded(units: list[Unit], dim: int = 4) -> list[Unit]:
    """Gives each unit one vector per input, as the consumer does."""
    for unit in units:
        unit.vectors = np.full((len(unit.inputs), dim), 0.5, np.float32)
    return units


def only_record(units: list[Unit], n_shards: int = 1) -> ChunkRecord:
    writes = ImageProcessor(ImagesConfig()).writes(embedded(units), n_shards)
    records = [r for write in writes.phase1.values() for r in write.upserts]
    assert len(records) == 1
    return records[0]


# -- prepare: what an image becomes ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_upsert_is_one_unit_with_one_rgb_uint8_input(fmt: str) -> None:
    (unit,) = prepared(processor(), item(image_b64=b64(encoded(fmt)), caption="a red rectangle"))
    (pixels,) = unit.inputs
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == (30, 40, 3)
    r, g, b = pixels[15, 20]
    assert r > 200 and g < 60 and b < 60  # red, within JPEG's error
    assert unit.counts == {"images": 1}


@pytest.mark.parametrize(
    ("size", "shape"),
    [
        ((2000, 1000), (256, 512, 3)),
        ((300, 1500), (512, 102, 3)),
        ((512, 512), (512, 512, 3)),
        ((7, 5), (5, 7, 3)),
    ],
)
def test_the_input_is_downscaled_to_the_longest_side_and_never_enlarged(
    size: tuple[int, int], shape: tuple[int, int, int]
) -> None:
    (unit,) = prepared(processor(), item(image_b64=b64(encoded(size=size))))
    assert unit.inputs[0].shape == shape
    assert MAX_INPUT_SIDE == 512


def test_model_input_keeps_a_side_of_at_least_one_pixel() -> None:
    assert model_input(Image.new("RGB", (4000, 2)), 512).shape == (1, 512, 3)
    assert model_input(Image.new("L", (3, 2)), 512).shape == (2, 3, 3)  # any mode comes out RGB


def test_an_easy_vqa_image_is_read_by_uri_under_its_root() -> None:
    data = packaged_dataset_dir("easy-vqa")
    path = data / "train" / "images" / "0.png"
    (unit,) = prepared(processor(data), item(uri=path.as_uri(), caption="a shape"))
    assert unit.inputs[0].shape == (64, 64, 3)


def test_a_file_under_a_root_is_read_and_one_outside_is_refused(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    elsewhere.mkdir()
    (root / "a.png").write_bytes(encoded())
    (elsewhere / "b.png").write_bytes(encoded())
    proc = processor(root)
    items = [
        item(0, uri=str(root / "a.png")),
        item(1, image_id="img-2", uri=str(elsewhere / "b.png")),
        item(2, image_id="img-3", uri=f"{root}/../private/b.png"),  # resolved before the check
    ]
    units, failed = proc.prepare(items, {})
    assert [u.item.id for u in units] == ["img-1"] and units[0].inputs[0].shape == (30, 40, 3)
    assert [i.id for i, _ in failed] == ["img-2", "img-3"]
    for _, error in failed:
        assert isinstance(error, InvalidImageError) and error.reason == "invalid_image"
        assert str(elsewhere / "b.png") in str(error) and "outside" in str(error)


def test_a_missing_file_and_corrupt_bytes_are_invalid_images(tmp_path: Path) -> None:
    truncated = encoded("JPEG", size=(64, 64))[:100]
    items = [
        item(0, uri=str(tmp_path / "gone.png")),
        item(1, image_b64=b64(b"not an image at all")),
        item(2, image_b64=b64(truncated)),
    ]
    for it in items:
        units, failed = processor(tmp_path).prepare([it], {})
        assert not units
        ((_, error),) = failed
        assert isinstance(error, InvalidImageError) and error.reason == "invalid_image"
    _, ((_, missing),) = processor(tmp_path).prepare([items[0]], {})
    assert "no such file" in str(missing) and "gone.png" in str(missing)


def test_an_unforeseen_failure_is_a_processing_error_and_the_rest_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = image_processor.decode

    def decode(data: bytes, limits: object) -> object:
        if data == encoded(color=(0, 0, 255)):
            raise MemoryError("out of memory")
        return real(data, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(image_processor, "decode", decode)
    bad = item(0, image_b64=b64(encoded(color=(0, 0, 255))))
    good = item(1, image_id="ok", image_b64=b64(encoded()))
    units, failed = processor().prepare([bad, good], {})
    assert [u.item.id for u in units] == ["ok"]
    assert failed == [(bad, "preparing the image failed: MemoryError: out of memory")]


def test_a_batch_fetches_its_images_at_once_and_keeps_their_order() -> None:
    """Each answer waits until READERS requests are in flight together: read one at a time, the
    first fetch would wait alone until the barrier breaks, and its image would fail."""
    barrier = threading.Barrier(READERS, timeout=10)
    colours = [(30 * i, 0, 255 - 30 * i) for i in range(READERS)]

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                self.answer(404, b"")
            else:
                self.answer(200, encoded(color=colours[int(self.path.strip("/"))]))

    with serving(Handler) as url:
        items = [item(i, image_id=f"img-{i}", uri=f"{url}/{i}") for i in range(READERS)]
        units, failed = ImageProcessor(ImagesConfig(allow_http=True)).prepare(items, {})
    assert failed == []
    assert [u.item.id for u in units] == [f"img-{i}" for i in range(READERS)]
    assert [tuple(int(c) for c in u.inputs[0][2, 2]) for u in units] == colours, (
        "each image's own pixels, in order"
    )


# -- deletes and the unchanged skip --------------------------------------------------------------


def test_a_delete_and_a_tombstone_delete_on_every_shard() -> None:
    delete = item(5, op="delete")
    tombstone = Item(Record(TOPIC, 1, 9, b"img-2", None), decode_record(b"img-2", None, default_kind="image"))
    units = prepared(processor(), delete, tombstone)
    assert [(u.inputs, u.counts) for u in units] == [([], {"deletes": 1})] * 2
    writes = processor().writes(embedded(units), 3)
    for write in writes.phase1.values():
        assert list(write.delete_documents) == ["img-1", "img-2"] and not write.upserts
        assert write.versions == {"img-1": (TOPIC, 0, 5), "img-2": (TOPIC, 1, 9)}
    assert writes.phase2 == {}


def _hash_of(it: Item, proc: ImageProcessor) -> str:
    (unit,) = prepared(proc, it)
    return str(unit.payload.content_hash)


def test_an_image_sent_again_is_unchanged_unless_in_progress() -> None:
    proc = processor()
    it = item(7, image_b64=b64(encoded()), caption="red", metadata={"b": 1, "a": "x"})
    digest = _hash_of(it, proc)
    row = DocumentRow(digest, 1, (TOPIC, 0, 3))

    (unit,) = prepared(proc, it, stored={"img-1": StoredDocument(row)})
    assert unit.inputs == [] and unit.counts == {"unchanged": 1}
    writes = proc.writes(embedded([unit]), 2)
    for write in writes.phase1.values():  # its version and truncation are still written
        assert (
            not write.upserts
            and write.truncate == {"img-1": 1}
            and write.versions == {"img-1": (TOPIC, 0, 7)}
        )
    (registry,) = writes.phase2
    assert registry == shard_of("img-1", 2)
    assert writes.phase2[registry].documents == {"img-1": DocumentRow(digest, 1, (TOPIC, 0, 7))}

    (unit,) = prepared(proc, it, stored={"img-1": StoredDocument(row, in_progress=True)})
    assert len(unit.inputs) == 1 and unit.counts == {"images": 1}
    other = DocumentRow("0" * 64, 1, (TOPIC, 0, 3))
    (unit,) = prepared(proc, it, stored={"img-1": StoredDocument(other)})
    assert len(unit.inputs) == 1


def test_the_content_hash_covers_image_caption_metadata_and_uri(tmp_path: Path) -> None:
    proc = processor(tmp_path)
    (tmp_path / "a.png").write_bytes(encoded())
    base = _hash_of(item(image_b64=b64(encoded()), caption="red", metadata={"a": 1, "b": "x"}), proc)
    same = item(3, image_b64=b64(encoded()), caption="red", metadata={"b": "x", "a": 1})
    assert _hash_of(same, proc) == base  # key order and the record's offset do not matter
    for changed in [
        item(image_b64=b64(encoded(color=(0, 255, 0))), caption="red", metadata={"a": 1, "b": "x"}),
        item(image_b64=b64(encoded()), caption="blue", metadata={"a": 1, "b": "x"}),
        item(image_b64=b64(encoded()), caption="red", metadata={"a": 1.0, "b": "x"}),
        item(image_b64=b64(encoded()), caption="red", metadata={"a": True, "b": "x"}),
        item(uri=str(tmp_path / "a.png"), caption="red", metadata={"a": 1, "b": "x"}),
    ]:
        assert _hash_of(changed, proc) != base
    assert len(base) == 64 and int(base, 16) >= 0
    envelope = ImageEnvelope(id="img-1", image_b64=b64(encoded()))
    assert content_hash("ab", envelope, 32) != content_hash("ab", envelope, 64)  # another thumbnail


# -- writes ------------------------------------------------------------------------------------


def test_the_record_of_an_inline_image() -> None:
    it = item(4, image_b64=b64(encoded(size=(300, 100))), caption="a red rectangle", metadata={"lang": "en"})
    record = only_record(prepared(processor(), it))
    assert (record.chunk_id, record.document_id, record.number) == ("img-1#0", "img-1", 0)
    assert (record.text, record.title, record.start, record.end) == ("a red rectangle", None, 0, 15)
    assert set(record.metadata) == {"lang", IMAGE_THUMBNAIL_KEY}  # no uri: it came inline
    thumb = Image.open(io.BytesIO(base64.b64decode(str(record.metadata[IMAGE_THUMBNAIL_KEY]))))
    assert thumb.format == "JPEG" and thumb.size == (THUMB, 11)
    assert record.alignment == "" and record.vector.shape == (4,)


def test_the_record_of_an_image_by_uri_without_caption(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(encoded(size=(10, 20)))
    uri = (tmp_path / "a.png").as_uri()
    record = only_record(prepared(processor(tmp_path), item(uri=uri)))
    assert (record.text, record.start, record.end) == ("", 0, 0)
    assert record.metadata[IMAGE_URI_KEY] == uri
    thumb = Image.open(io.BytesIO(base64.b64decode(str(record.metadata[IMAGE_THUMBNAIL_KEY]))))
    assert thumb.size == (10, 20)  # never enlarged


def test_writes_route_records_by_chunk_id_and_rows_by_image_id() -> None:
    n = 4
    items = [item(i, image_id=f"i{i}", image_b64=b64(encoded())) for i in range(12)]
    units = embedded(prepared(processor(), *items))
    writes = processor().writes(units, n)
    assert set(writes.phase1) == set(range(n))
    for shard, write in writes.phase1.items():
        assert all(shard_of(r.chunk_id, n) == shard for r in write.upserts)
        assert write.truncate == {f"i{i}": 1 for i in range(12)}
        assert write.versions == {f"i{i}": (TOPIC, 0, i) for i in range(12)}
    assert sorted(r.chunk_id for w in writes.phase1.values() for r in w.upserts) == sorted(
        f"i{i}#0" for i in range(12)
    )
    for shard, write in writes.phase2.items():
        assert write.documents and all(shard_of(doc, n) == shard for doc in write.documents)
        assert write.versions == {doc: row.source for doc, row in write.documents.items()}
        assert all(row.n_chunks == 1 for row in write.documents.values())
    assert sum(len(w.documents) for w in writes.phase2.values()) == 12


@pytest.mark.parametrize("rows", [None, 0, 2])
def test_a_unit_without_exactly_one_vector_cannot_be_written(rows: int | None) -> None:
    (unit,) = prepared(processor(), item(image_b64=b64(encoded())))
    unit.vectors = None if rows is None else np.zeros((rows, 4), np.float32)
    with pytest.raises(ValueError, match=f"image 'img-1': 1 input but {rows} vectors"):
        processor().writes([unit], 2)
