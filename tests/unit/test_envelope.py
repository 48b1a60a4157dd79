import json
import pickle

import pytest

from schemas.envelope import (
    DocumentEnvelope,
    ImageEnvelope,
    InvalidEnvelopeError,
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


# --- the holes a valid-looking record could slip through: every one is refused at the edge, naming
# --- the field, so no such record ever reaches a store (where it would stop the partition).


def decode_text(text: str, key: bytes = b"a"):
    """Decodes a record whose value is ``text`` exactly as written (JSON escapes kept as escapes)."""
    return decode_record(key, text.encode("utf-8"))


def rejection(text: str, key: bytes = b"a") -> PoisonMessageError:
    with pytest.raises(PoisonMessageError) as info:
        decode_text(text, key)
    message = str(info.value)
    message.encode("utf-8")  # dead letters carry the message in headers: it must encode
    return info.value


def with_metadata(raw_value: str, key: str = "n") -> str:
    return '{"kind": "document", "id": "a", "text": "x", "metadata": {"' + key + '": ' + raw_value + "}}"


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)])
def test_metadata_integers_outside_int64_are_refused(value):
    error = rejection(with_metadata(str(value)))
    assert error.reason == "invalid_envelope"
    assert "metadata.n" in str(error) and "64-bit" in str(error)


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 0, -1])
def test_metadata_integers_at_the_int64_bounds_are_kept(value):
    env = decode_text(with_metadata(str(value)))
    assert env.metadata == {"n": value} and type(env.metadata["n"]) is int


def test_an_integer_too_long_to_parse_is_not_json():
    error = rejection(with_metadata("9" * 5000))
    assert error.reason == "invalid_json"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_not_json_and_the_field_is_named(literal):
    error = rejection(with_metadata(literal, key="score"))
    assert error.reason == "invalid_json"
    assert "metadata.score" in str(error) and literal.lstrip("-") in str(error)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_non_finite_numbers_are_refused_outside_metadata_too(literal):
    text = '{"kind": "document", "id": "a", "text": "x", "extra": {"deep": [1, ' + literal + "]}}"
    error = rejection(text)
    assert error.reason == "invalid_json" and "extra.deep[1]" in str(error)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_from_python_are_invalid_envelopes(value):
    # What an HTTP body parsed by a lenient parser, or a Python producer, would hand over.
    with pytest.raises(PoisonMessageError) as info:
        validate_envelope({"kind": "document", "id": "a", "text": "x", "metadata": {"score": value}})
    assert info.value.reason == "invalid_envelope" and "metadata.score" in str(info.value)


def test_large_finite_floats_are_kept():
    env = decode_text(with_metadata("1.7976931348623157e308"))
    assert env.metadata["n"] == 1.7976931348623157e308


def test_booleans_and_numeric_strings_keep_their_kind():
    env = decode_text('{"kind": "document", "id": "a", "text": "x", "metadata": {"b": true, "s": "1"}}')
    assert env.metadata == {"b": True, "s": "1"} and type(env.metadata["b"]) is bool


DOCUMENT = {"kind": "document", "id": "a", "title": "t", "text": "body"}
IMAGE_URI = {"kind": "image", "id": "a", "uri": "s3://bucket/x.png", "caption": "c"}
IMAGE_B64 = {"kind": "image", "id": "a", "image_b64": "aGk="}


@pytest.mark.parametrize(
    ("base", "field"),
    [
        (DOCUMENT, "id"),
        (DOCUMENT, "title"),
        (DOCUMENT, "text"),
        (IMAGE_URI, "id"),
        (IMAGE_URI, "uri"),
        (IMAGE_URI, "caption"),
        (IMAGE_B64, "image_b64"),
    ],
)
@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff", "x\udc00y"])
def test_a_lone_surrogate_in_any_field_is_refused_naming_it(base, field, surrogate):
    obj = {**base, field: surrogate}
    text = json.dumps(obj)  # ASCII, the surrogate as a JSON escape ("\ud800"), as a producer sends it
    assert "\\ud" in text or "\\udc00" in text
    error = rejection(text, key=b"a")
    assert error.reason == "invalid_envelope"
    assert str(error).startswith(f"{field}:") and "lone surrogate" in str(error)


def test_a_lone_surrogate_in_a_metadata_value_is_refused_naming_the_key():
    error = rejection(json.dumps({**DOCUMENT, "metadata": {"lang": "e\ud800n"}}))
    assert error.reason == "invalid_envelope"
    assert "metadata.lang" in str(error) and "lone surrogate" in str(error)


def test_a_lone_surrogate_in_a_metadata_key_is_refused_naming_the_key_escaped():
    error = rejection(json.dumps({**DOCUMENT, "metadata": {"la\ud800ng": "en"}}))
    assert error.reason == "invalid_envelope"
    assert "metadata key 'la\\ud800ng'" in str(error) and "lone surrogate" in str(error)


def test_a_lone_surrogate_in_a_delete_is_refused():
    error = rejection(json.dumps({"kind": "document", "id": "\ud800", "op": "delete"}))
    assert error.reason == "invalid_envelope" and str(error).startswith("id:")


def test_a_surrogate_in_python_construction_is_refused_too():
    with pytest.raises(ValueError, match="title"):
        DocumentEnvelope(id="a", title="\ud800", text="x")
    with pytest.raises(ValueError, match="metadata"):
        DocumentEnvelope(id="a", text="x", metadata={"n": 2**63})


NON_BMP = "emoji \U0001f600, clef \U0001d11e, cjk \U00020000"


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_characters_beyond_the_bmp_are_kept_everywhere(ensure_ascii):
    # ensure_ascii=True writes each as a surrogate pair escape ("\ud83d\ude00"): a pair is valid.
    doc = {**DOCUMENT, "id": "d\U0001f600", "title": NON_BMP, "text": NON_BMP, "metadata": {NON_BMP: NON_BMP}}
    env = decode_record(doc["id"].encode(), json.dumps(doc, ensure_ascii=ensure_ascii).encode())
    assert env.id == "d\U0001f600" and env.title == NON_BMP and env.text == NON_BMP
    assert env.metadata == {NON_BMP: NON_BMP}
    assert decode_record(*encode_envelope(env)) == env
    image = {**IMAGE_URI, "uri": f"file:///{NON_BMP}", "caption": NON_BMP}
    img = decode_record(b"a", json.dumps(image, ensure_ascii=ensure_ascii).encode())
    assert img.caption == NON_BMP and img.uri == f"file:///{NON_BMP}"


def test_json_nested_too_deeply_is_refused_not_a_crash():
    error = rejection("[" * 100_000 + "]" * 100_000)
    assert error.reason == "invalid_json"


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_schema_version_is_the_json_integer_1_not_something_equal_to_it(version):
    error = rejection('{"schema_version": ' + version + ', "kind": "document", "id": "a", "text": "x"}')
    assert error.reason == "invalid_envelope" and str(error).startswith("schema_version:")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"metadata": {"year": 2**64}}, "metadata.year"),
        ({"metadata": {"score": float("inf")}}, "metadata.score"),
        ({"metadata": {"la\ud800ng": "en"}}, "metadata"),
        ({"title": "bad \ud800"}, "title"),
        ({"id": "s\udc00"}, "id"),
        ({"text": " "}, None),  # the envelope as a whole: text is required for an upsert
    ],
)
def test_an_invalid_envelope_names_its_first_bad_field_as_a_json_path(fields, field):
    with pytest.raises(InvalidEnvelopeError) as info:
        validate_envelope({**DOCUMENT, **fields})
    assert info.value.field == field and info.value.reason == "invalid_envelope"


def test_an_invalid_envelope_error_survives_pickling_with_its_field():
    with pytest.raises(InvalidEnvelopeError) as info:
        validate_envelope({**DOCUMENT, "metadata": {"year": 2**64}})
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.field, copy.reason, str(copy)) == ("metadata.year", "invalid_envelope", str(info.value))


@pytest.mark.parametrize("key", ["_image_uri", "_image_thumbnail_b64"])
def test_image_metadata_may_not_use_the_keys_that_hold_its_uri_and_thumbnail(key):
    with pytest.raises(InvalidEnvelopeError, match=f"metadata keys '{key}' are reserved"):
        validate_envelope({"kind": "image", "id": "i", "image_b64": "AA==", "metadata": {key: "x"}})
    # documents may use them: only image records store anything under them
    assert validate_envelope({"kind": "document", "id": "d", "text": "t", "metadata": {key: "x"}}).metadata
