import json

import pytest

from schemas.envelope import (
    DocumentEnvelope,
    ImageEnvelope,
    decode_record,
    encode_envelope,
    validate_envelope,
)
from schemas.errors import DEAD_LETTER_REASONS, PoisonMessageError


def record(obj, key=None):
    value = json.dumps(obj).encode()
    return (key if key is not None else obj.get("id", "").encode()), value


def test_document_round_trip():
    env = DocumentEnvelope(id="doc-42", title="T", text="the body", metadata={"lang": "en", "year": 2001})
    key, value = encode_envelope(env)
    assert key == b"doc-42"
    back = decode_record(key, value)
    assert back == env
    assert json.loads(value)["schema_version"] == 1


def test_design_examples_parse():
    doc = {
        "schema_version": 1,
        "kind": "document",
        "id": "doc-42",
        "op": "upsert",
        "title": "optional",
        "text": "the body",
        "metadata": {"lang": "en", "source": "wiki"},
    }
    img = {
        "schema_version": 1,
        "kind": "image",
        "id": "img-7",
        "op": "upsert",
        "image_b64": "aGk=",
        "uri": None,
        "caption": "optional",
        "metadata": {},
    }
    dele = {"schema_version": 1, "kind": "document", "id": "doc-42", "op": "delete"}
    assert isinstance(decode_record(*record(doc)), DocumentEnvelope)
    assert isinstance(decode_record(*record(img)), ImageEnvelope)
    assert decode_record(*record(dele)).is_delete


def test_unknown_fields_are_ignored():
    env = decode_record(*record({"kind": "document", "id": "a", "text": "x", "future_field": [1, 2]}))
    assert env.id == "a" and not hasattr(env, "future_field")


def test_metadata_types_preserved():
    env = validate_envelope(
        {
            "kind": "document",
            "id": "a",
            "text": "x",
            "metadata": {"s": "1", "i": 1, "f": 1.5, "b": True},
        }
    )
    assert env.metadata == {"s": "1", "i": 1, "f": 1.5, "b": True}
    assert type(env.metadata["b"]) is bool and type(env.metadata["i"]) is int


def test_tombstone_is_delete_of_topic_kind():
    env = decode_record(b"doc-9", None)
    assert env.is_delete and env.id == "doc-9" and env.kind == "document"
    img = decode_record(b"img-1", None, default_kind="image")
    assert img.kind == "image" and img.is_delete


@pytest.mark.parametrize(
    ("key", "value", "reason", "needle"),
    [
        (b"a", b"{not json", "invalid_json", "not JSON"),
        (b"a", b"\xff\xfe", "bad_encoding", "UTF-8"),
        (b"\xff", b"{}", "bad_encoding", "key"),
        (b"a", b"[1, 2]", "invalid_envelope", "JSON object"),
        (b"a", json.dumps({"id": "a", "text": "x"}).encode(), "invalid_envelope", "kind"),
        (b"a", json.dumps({"kind": "video", "id": "a"}).encode(), "invalid_envelope", "kind"),
        (b"a", json.dumps({"kind": "document", "id": "a"}).encode(), "invalid_envelope", "text"),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": "  "}).encode(),
            "invalid_envelope",
            "blank",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "", "text": "x"}).encode(),
            "invalid_envelope",
            "id",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": 5}).encode(),
            "invalid_envelope",
            "text",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": "x", "op": "merge"}).encode(),
            "invalid_envelope",
            "op",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": "x", "metadata": {"k": [1]}}).encode(),
            "invalid_envelope",
            "metadata.k",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": "x", "metadata": {"k": None}}).encode(),
            "invalid_envelope",
            "metadata.k",
        ),
        (
            b"a",
            json.dumps({"kind": "document", "id": "a", "text": "x", "schema_version": 2}).encode(),
            "invalid_envelope",
            "newer",
        ),
        (
            b"a",
            json.dumps({"kind": "image", "id": "a"}).encode(),
            "invalid_envelope",
            "exactly one",
        ),
        (
            b"a",
            json.dumps({"kind": "image", "id": "a", "uri": "f", "image_b64": "eA=="}).encode(),
            "invalid_envelope",
            "exactly one",
        ),
        (
            b"b",
            json.dumps({"kind": "document", "id": "a", "text": "x"}).encode(),
            "key_mismatch",
            "differs",
        ),
        (
            None,
            json.dumps({"kind": "document", "id": "a", "text": "x"}).encode(),
            "key_mismatch",
            "no key",
        ),
        (None, None, "invalid_envelope", "tombstone"),
    ],
)
def test_rejections_name_reason_and_field(key, value, reason, needle):
    with pytest.raises(PoisonMessageError) as info:
        decode_record(key, value)
    assert info.value.reason == reason
    assert reason in DEAD_LETTER_REASONS
    assert needle in str(info.value)


def test_too_large():
    value = json.dumps({"kind": "document", "id": "a", "text": "x" * 1000}).encode()
    with pytest.raises(PoisonMessageError) as info:
        decode_record(b"a", value, max_bytes=100)
    assert info.value.reason == "too_large"


def test_delete_needs_no_text_and_ignores_body_fields():
    env = validate_envelope({"kind": "document", "id": "a", "op": "delete"})
    assert env.is_delete and env.text is None


def test_control_characters_in_id_rejected():
    with pytest.raises(PoisonMessageError):
        validate_envelope({"kind": "document", "id": "a\nb", "text": "x"})
