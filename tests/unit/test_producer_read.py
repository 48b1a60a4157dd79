import json

import pytest

from cluster.producer import read_records


def test_jsonl_envelopes_plain_documents_and_bad_lines_with_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"kind": "document", "id": "e1", "text": "envelope", "metadata": {"lang": "en"}}),
        json.dumps({"id": "p1", "title": "Plain", "text": "a BEIR corpus line"}),
        json.dumps({"_id": "p2", "text": "BEIR with _id"}),
        "",
        "{broken",
        json.dumps({"kind": "document", "id": "e2"}),
        json.dumps({"kind": "document", "id": "d1", "op": "delete"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    records = list(read_records(path))
    assert [r.location for r in records] == [
        "in.jsonl:1",
        "in.jsonl:2",
        "in.jsonl:3",
        "in.jsonl:5",
        "in.jsonl:6",
        "in.jsonl:7",
    ]
    good = [r.envelope for r in records if r.envelope]
    assert [e.id for e in good] == ["e1", "p1", "p2", "d1"]
    assert good[1].title == "Plain" and good[3].is_delete
    assert good[1].metadata == {"title": "Plain"}  # filterable
    assert good[2].metadata == {} and good[0].metadata == {"lang": "en"}
    bad = {r.location: r.error for r in records if r.error}
    assert "invalid JSON" in bad["in.jsonl:5"]
    assert "text" in bad["in.jsonl:6"]


def test_directory_of_text_and_markdown(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("intro\n\n# The Title #\n\nbody")
    (tmp_path / "sub" / "b.txt").write_text("plain text")
    (tmp_path / "sub" / "bad.txt").write_bytes(b"\xff\xfe bad")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    records = list(read_records(tmp_path))
    assert [r.location for r in records] == ["a.md", "sub/b.txt", "sub/bad.txt"]
    a, b, bad = records
    assert a.envelope.id == "a.md" and a.envelope.title == "The Title"
    assert a.envelope.metadata == {"format": "markdown"}
    assert b.envelope.id == "sub/b.txt" and b.envelope.title == "b"
    assert bad.envelope is None and "UTF-8" in bad.error


def test_image_files_become_inline_image_envelopes_captioned_by_their_sidecar(tmp_path):
    import base64
    import io

    from PIL import Image

    def png(color: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(out, format="PNG")
        return out.getvalue()

    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "shapes" / "red.txt").write_text("  a red square\n")  # a caption, not a document
    (tmp_path / "shapes" / "blue.JPG").write_bytes(b"not even a jpeg")  # decoded (and refused) downstream
    (tmp_path / "shapes" / "blue.txt").write_bytes(b"\xff bad caption")
    (tmp_path / "notes.txt").write_text("a document")
    records = list(read_records(tmp_path))
    assert [r.location for r in records] == ["notes.txt", "shapes/blue.JPG", "shapes/red.png"]
    notes, blue, red = records
    assert notes.envelope.kind == "document"
    assert blue.envelope is None and "caption blue.txt is not UTF-8" in blue.error
    assert red.envelope.kind == "image" and red.envelope.id == "shapes/red.png"
    assert base64.b64decode(red.envelope.image_b64) == png((255, 0, 0))
    assert red.envelope.caption == "a red square" and red.envelope.uri is None
    assert red.envelope.metadata == {"format": "png", "file": "red.png"}

    (single,) = read_records(tmp_path / "shapes" / "red.png")
    assert single.envelope.id == "red.png" and single.envelope.caption == "a red square"
    (tmp_path / "shapes" / "blue.txt").unlink()
    (uncaptioned,) = [r for r in read_records(tmp_path / "shapes") if r.location == "blue.JPG"]
    assert uncaptioned.envelope.caption is None and uncaptioned.envelope.metadata["format"] == "jpeg"


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "nope.jsonl"))
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        list(read_records(other))


def test_sample_corpus_is_vendored_and_complete():
    from pathlib import Path

    corpus = Path(__file__).parents[2] / "data" / "squad-v1.1-dev" / "corpus.jsonl"
    records = list(read_records(corpus))
    assert len(records) == 2067 and all(r.envelope for r in records)
    assert len({r.envelope.id for r in records}) == 2067
