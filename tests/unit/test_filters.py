"""MetadataFilter: parsing, errors, the same answer from matches() and from SQL, and the Milvus text."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from schemas.filters import Condition, MetadataFilter, milvus_kinds

DESIGN_EXAMPLE: dict[str, object] = {
    "lang": "en",
    "year": {"gte": 2000, "lt": 2020},
    "source": {"in": ["a", "b"]},
}

DOCS: list[dict[str, object]] = [
    {"lang": "en", "year": 2005, "source": "a", "flag": True, "score": 0.5},
    {"lang": "en", "year": 2020, "source": "b", "flag": False},
    {"lang": "de", "year": 2010, "source": "a", "score": 1},
    {"lang": "en", "year": "2010", "source": "c", "flag": 1},
    {"year": 1999.5},
    {},
    {"lang": "EN", "source": "b", "weird-key_1": "x"},
]

CASES: list[tuple[dict[str, object], list[int]]] = [
    (DESIGN_EXAMPLE, [0]),
    ({}, [0, 1, 2, 3, 4, 5, 6]),
    ({"lang": "en"}, [0, 1, 3]),
    ({"lang": {"eq": "en"}}, [0, 1, 3]),
    ({"lang": {"ne": "en"}}, [2, 4, 5, 6]),  # ne matches a missing field
    ({"year": {"gt": 2005}}, [1, 2]),  # "2010" is a string: never compared with a number
    ({"year": {"lte": 2005}}, [0, 4]),
    ({"year": {"gte": "2000"}}, [3]),  # strings compare with strings only
    ({"year": 2010}, [2]),
    ({"score": 1.0}, [2]),  # 1 == 1.0
    ({"flag": True}, [0]),  # true is not 1
    ({"flag": False}, [1]),
    ({"flag": {"ne": True}}, [1, 2, 3, 4, 5, 6]),
    ({"flag": {"in": [True, False]}}, [0, 1]),
    ({"source": {"in": ["a", "b"]}}, [0, 1, 2, 6]),
    ({"source": {"nin": ["a", "b"]}}, [3, 4, 5]),  # nin matches a missing field
    ({"year": {"in": [2005, 2010]}}, [0, 2]),
    ({"lang": {"lt": "en"}}, [2, 6]),  # code-point order: "EN" < "de" < "en"
    ({"weird-key_1": "x"}, [6]),
    ({"missing": "x"}, []),
    ({"missing": {"gt": 0}}, []),
    ({"lang": "en", "source": "b"}, [1]),
]


@pytest.fixture(scope="module")
def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, metadata TEXT NOT NULL)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, json.dumps(d)) for i, d in enumerate(DOCS)])
    return conn


@pytest.mark.parametrize(("raw", "expected"), CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_matches_and_sql_agree(db: sqlite3.Connection, raw: dict[str, object], expected: list[int]) -> None:
    f = MetadataFilter.parse(raw)
    assert [i for i, d in enumerate(DOCS) if f.matches(d)] == expected
    where, params = f.to_sql()
    rows = db.execute(f"SELECT id FROM t WHERE {where} ORDER BY id", params).fetchall()
    assert [r[0] for r in rows] == expected


def test_parse_design_example() -> None:
    f = MetadataFilter.parse(DESIGN_EXAMPLE)
    assert f.conditions == (
        Condition(field="lang", op="eq", value="en"),
        Condition(field="year", op="gte", value=2000),
        Condition(field="year", op="lt", value=2020),
        Condition(field="source", op="in", value=("a", "b")),
    )
    assert f.fields == {"lang", "year", "source"}


def test_pydantic_validation_and_round_trips() -> None:
    f = MetadataFilter.parse(DESIGN_EXAMPLE)
    assert MetadataFilter.model_validate(DESIGN_EXAMPLE) == f  # usable as a request field
    assert MetadataFilter.parse(f.to_raw()) == f
    assert MetadataFilter.model_validate(f.model_dump()) == f
    assert MetadataFilter.model_validate_json(f.model_dump_json()) == f
    with pytest.raises(ValueError, match="frozen"):
        f.conditions = ()  # type: ignore[misc]
    # a metadata field may be called "conditions"
    assert MetadataFilter.parse({"conditions": "x"}).matches({"conditions": "x"})
    assert MetadataFilter.model_validate({"conditions": "x"}).conditions[0].field == "conditions"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"year": {"between": [1, 2]}}, r"'year': unknown operator 'between'"),
        ({"source": {"in": []}}, r"'source', operator 'in': the list is empty"),
        ({"source": {"in": "a"}}, r"'source', operator 'in': needs a list"),
        ({"source": {"in": ["a", 1]}}, r"'source', operator 'in': the list mixes"),
        ({"tags": ["a", "b"]}, r"'tags', operator 'eq': .*got list \(use \{'in'"),
        ({"lang": None}, r"'lang', operator 'eq': .*got null"),
        ({"lang": {"eq": {"x": 1}}}, r"'lang', operator 'eq': .*got dict"),
        ({"year": {}}, r"'year': no operator"),
        ({"year": {"gt": True}}, r"'year', operator 'gt': needs a number or a string"),
        ({"year": {"gt": float("nan")}}, r"not a finite number"),
        ({"year": 2**64}, r"outside the 64-bit"),
        ({"year": {"gte": -(2**63) - 1}}, r"'year', operator 'gte': .*outside the 64-bit"),
        ({"lang": "e\ud800n"}, r"'lang', operator 'eq': holds a lone surrogate \(U\+D800\)"),
        ({"lang": {"in": ["en", "\udc00"]}}, r"'lang', operator 'in': holds a lone surrogate"),
        ({"a.b": 1}, r"filter field 'a.b': names must match"),
        ({'x") OR 1=1 --': 1}, r"names must match"),
        ({"": 1}, r"names must match"),
    ],
)
def test_bad_filters_name_field_and_reason(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetadataFilter.parse(raw)
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError is a ValueError
        MetadataFilter.model_validate(raw)


def test_the_int64_bounds_themselves_are_filter_values() -> None:
    # A record may hold -2**63 (schemas.metadata), so a filter must be able to name it.
    low, high = -(2**63), 2**63 - 1
    parsed = MetadataFilter.parse({"n": {"gte": low, "lte": high}})
    assert [c.value for c in parsed.conditions] == [low, high]
    assert parsed.matches({"n": low}) and parsed.matches({"n": high})


def test_condition_built_directly_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        Condition(field="x", op="like", value="a")
    with pytest.raises(ValueError, match="needs a list"):
        Condition(field="x", op="in", value="a")


def test_sql_binds_values_never_interpolates() -> None:
    where, params = MetadataFilter.parse({"lang": "en' OR '1'='1", "year": {"in": [1, 2]}}).to_sql()
    assert "OR '1'" not in where and "lang" not in where
    assert "en' OR '1'='1" in params and '$."lang"' in params
    with pytest.raises(ValueError, match="unsafe column"):
        MetadataFilter.parse({"a": 1}).to_sql("metadata; DROP TABLE t")


def test_empty_filter_is_true_in_sql() -> None:
    assert MetadataFilter.parse({}).to_sql() == ("1", [])


def test_empty_filter_is_no_milvus_expression() -> None:
    assert MetadataFilter.parse({}).to_milvus() == ""


def test_milvus_expression_guards_every_condition_with_the_kinds_field() -> None:
    f = MetadataFilter.parse({"lang": "en", "my-key": {"nin": [1, 2.5]}, "flag": {"in": [True]}})
    assert f.to_milvus() == (
        '(exists kinds["lang"] and kinds["lang"] == "s" and metadata["lang"] == "en")'
        ' and (not (exists kinds["my-key"] and kinds["my-key"] == "n"'
        ' and (metadata["my-key"] == 1 or metadata["my-key"] == 2.5)))'
        ' and (exists kinds["flag"] and kinds["flag"] == "b" and metadata["flag"] == true)'
    )
    assert MetadataFilter.parse({"y": {"gte": 1, "lt": 2}}).to_milvus("m", "k") == (
        '(exists k["y"] and k["y"] == "n" and m["y"] >= 1)'
        ' and (exists k["y"] and k["y"] == "n" and m["y"] < 2)'
    )


def test_milvus_string_literals_escape_quotes_backslashes_and_line_breaks() -> None:
    expr = MetadataFilter.parse({"lang": 'en" or 1==1 or "\\\n\r\t\x01é'}).to_milvus()
    assert expr.endswith(' == "en\\" or 1==1 or \\"\\\\\\n\\r\t\x01é")')
    assert "\n" not in expr and "\r" not in expr


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (2**63 - 1, "9223372036854775807"),
        (-(2**63), "-9223372036854775808"),
        (2.0, "2.0"),
        (-0.0, "-0.0"),
        (0.1, "0.1"),
        (0.30000000000000004, "0.30000000000000004"),
        (1e16, "1e+16"),
        (5e-324, "5e-324"),
        (-1.7976931348623157e308, "-1.7976931348623157e+308"),
    ],
)
def test_milvus_number_literals_read_back_exactly(value: bool | int | float, text: str) -> None:
    expr = MetadataFilter.parse({"x": value}).to_milvus()
    assert expr.endswith(f'metadata["x"] == {text})')
    if not isinstance(value, bool):
        back = type(value)(text)
        assert back == value and str(back) == str(value)  # the same type, and -0.0 stays -0.0


def test_milvus_kinds_names_each_scalar_kind_and_skips_the_rest() -> None:
    metadata: dict[str, object] = {"a": "x", "b": 1, "c": 1.5, "d": True, "e": False, "f": [1], "g": None}
    assert milvus_kinds(metadata) == {"a": "s", "b": "n", "c": "n", "d": "b", "e": "b"}
    assert milvus_kinds({}) == {}


@pytest.mark.parametrize(
    ("column", "kinds", "message"),
    [
        ("meta data", "kinds", "unsafe Milvus field name 'meta data'"),
        ('metadata["x"]', "kinds", "unsafe Milvus field name"),
        ("metadata", "1kinds", "unsafe Milvus field name '1kinds'"),
        ("not", "kinds", "unsafe Milvus field name 'not'"),
        ("metadata", "NULL", "unsafe Milvus field name 'NULL'"),
        ("True", "kinds", "unsafe Milvus field name 'True'"),
        ("", "kinds", "unsafe Milvus field name ''"),
        ("m" * 256, "kinds", "unsafe Milvus field name 'mmm"),
        ("metadata", "metadata", "must differ, both are 'metadata'"),
    ],
)
def test_unsafe_milvus_field_names_are_refused(column: str, kinds: str, message: str) -> None:
    f = MetadataFilter.parse({"a": 1})
    for call in (f.to_milvus, MetadataFilter.parse({}).to_milvus, f.conditions[0].to_milvus):
        with pytest.raises(ValueError, match=re.escape(message)):
            call(column, kinds)
