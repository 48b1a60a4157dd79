"""schemas.metadata: what a record may hold, and the strict JSON parser; and the HTTP request
bodies that share its string rule."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

import schemas.api
import schemas.envelope
from schemas.api import EmbeddingsRequest, RagRequest, SearchHit, SearchRequest
from schemas.metadata import (
    INT64_MAX,
    INT64_MIN,
    MetadataValue,
    loads_json,
    metadata_problem,
    printable,
    string_problem,
    value_problem,
)


def test_metadata_value_is_defined_once_and_shared():
    assert schemas.api.MetadataValue is MetadataValue
    assert schemas.envelope.MetadataValue is MetadataValue


@pytest.mark.parametrize("text", ["", "plain", "日本語", "\U0001f600 emoji", "\ufffd", "\x00 nul"])
def test_strings_that_any_store_can_take(text):
    assert string_problem(text) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [("\ud800", "U+D800) at position 0"), ("ab\udfff", "U+DFFF) at position 2"), ("\udc00\ud800", "U+DC00")],
)
def test_a_lone_surrogate_is_named_with_its_position(text, needle):
    problem = string_problem(text)
    assert problem is not None and "lone surrogate" in problem and needle in problem


@pytest.mark.parametrize(
    "value", ["s", True, False, 0, INT64_MAX, INT64_MIN, 1.5, -0.0, 1.7976931348623157e308, 5e-324]
)
def test_values_that_every_backend_stores_and_filters_alike(value):
    assert value_problem(value) is None


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (INT64_MAX + 1, "64-bit range"),
        (INT64_MIN - 1, "64-bit range"),
        # too long to print in decimal (as pytest's test id, too): named by its size
        pytest.param(10**5000, "of 16610 bits", id="huge-int"),
        (math.nan, "not a finite number"),
        (math.inf, "not a finite number"),
        (-math.inf, "not a finite number"),
        ("x\ud800", "lone surrogate"),
        ("a\x00b", "NUL (U+0000) at position 1"),
        (None, "got NoneType"),
        ([1], "got list"),
        ({"a": 1}, "got dict"),
        (b"bytes", "got bytes"),
    ],
)
def test_values_that_cannot_be_stored_say_why(value, needle):
    problem = value_problem(value)
    assert problem is not None and needle in problem


def test_metadata_problem_names_the_key():
    assert metadata_problem({"lang": "en", "year": 2001, "ok": True}) is None
    assert metadata_problem({"lang": "en", "year": 2**63}).startswith("metadata.year: integer")
    assert "metadata key 1" in metadata_problem({1: "x"})
    problem = metadata_problem({"la\ud800": "x"})
    assert "lone surrogate" in problem and printable(problem) == problem  # the key is escaped
    assert "metadata key 'l\\x00' holds NUL" in metadata_problem({"l\x00": "x"})


def test_an_envelope_with_nul_in_metadata_is_refused_naming_the_field():
    # SQLite's JSON functions (the FAISS backend's filters) end a string at NUL: refused at the edge,
    # so no backend stores a value its filters would see otherwise. Text may hold NUL.
    ok = schemas.envelope.validate_envelope(
        {"kind": "document", "id": "d", "text": "a\x00b", "metadata": {"k": "v"}}
    )
    assert ok.text == "a\x00b"
    for metadata, field in [({"k": "a\x00"}, "metadata.k"), ({"k\x00": "v"}, "metadata")]:
        with pytest.raises(schemas.envelope.InvalidEnvelopeError, match="NUL") as caught:
            schemas.envelope.validate_envelope(
                {"kind": "document", "id": "d", "text": "t", "metadata": metadata}
            )
        assert caught.value.field == field


def test_printable_escapes_only_lone_surrogates():
    assert printable("a\ud800b") == "a\\ud800b"
    assert printable("日本 \U0001f600") == "日本 \U0001f600"


def test_loads_json_parses_valid_json_like_json_loads():
    text = '{"a": [1, 2.5, -3e10, true, null, "s"], "big": 18446744073709551616, "pair": "\\ud83d\\ude00"}'
    assert loads_json(text) == json.loads(text)
    assert loads_json(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"score": NaN}', "score: NaN is not valid JSON"),
        ('{"a": {"b": Infinity}}', "a.b: Infinity is not valid JSON"),
        ('{"a": [0, -Infinity]}', "a[1]: -Infinity is not valid JSON"),
        ('{"x": 1e999}', "x: number 1e999 is too large"),
        ('{"x": -1e999}', "x: number -1e999 is too large"),
        ("NaN", "NaN is not valid JSON"),
        ('{"\\ud800": NaN}', "\\ud800: NaN"),  # the path is escaped, so the message encodes
    ],
)
def test_loads_json_refuses_non_finite_numbers_naming_where(text, needle):
    with pytest.raises(ValueError) as info:
        loads_json(text)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert needle in str(info.value)
    str(info.value).encode("utf-8")


def test_loads_json_reports_malformed_text_as_json_decode_error():
    with pytest.raises(json.JSONDecodeError):
        loads_json('{"a": ')


# --- HTTP request bodies: the same string rule, a 400 naming the field (pydantic's loc)


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (SearchRequest, {"query": "caf\ud800"}, "query"),
        (RagRequest, {"question": "\udfff?"}, "question"),
        (EmbeddingsRequest, {"input": "\ud800"}, "input"),
        (EmbeddingsRequest, {"input": ["ok", "\ud800"]}, "input"),
    ],
)
def test_request_strings_with_a_lone_surrogate_are_refused(model, body, field):
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = info.value.errors()
    assert errors and all(err["loc"][0] == field for err in errors)
    assert any("lone surrogate" in err["msg"] for err in errors)


def test_request_strings_beyond_the_bmp_are_accepted():
    assert SearchRequest.model_validate({"query": "\U0001f600 café"}).query == "\U0001f600 café"
    assert EmbeddingsRequest.model_validate({"input": ["\U0001f600"]}).input == ["\U0001f600"]


def test_search_modes_are_the_shared_ones():
    from schemas.topology import SEARCH_MODES

    for mode in SEARCH_MODES:
        assert SearchRequest.model_validate({"query": "q", "mode": mode}).mode == mode
    with pytest.raises(ValidationError):
        SearchRequest.model_validate({"query": "q", "mode": "semantic"})


def test_a_hit_keeps_its_metadata_kinds():
    hit = SearchHit(
        chunk_id="a#0",
        document_id="a",
        title=None,
        text="t",
        span=(0, 1),
        score=1.0,
        metadata={"b": True, "i": 1, "f": 1.5, "s": "1"},
    )
    assert [type(v) for v in hit.metadata.values()] == [bool, int, float, str]
