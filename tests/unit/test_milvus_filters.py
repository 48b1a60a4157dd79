"""MetadataFilter.to_milvus against a real embedded Milvus Lite: every filter must select exactly the
rows MetadataFilter.matches selects, on rows built to trip each difference of Milvus's dialect
(missing keys, one key holding several kinds, true against 1, int against float, int64 bounds,
code-point order, quotes, backslashes and line breaks in values)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.filters import OPS, MetadataFilter, kind_of, milvus_kinds
from schemas.metadata import INT64_MAX, INT64_MIN

if TYPE_CHECKING:
    from pymilvus import MilvusClient

COLLECTION = "filters"
INJECTION = 'en" or 1==1 or "'

ROWS: list[dict[str, object]] = [
    {"lang": "en", "year": 2005, "flag": True, "score": 0.5, "source": "a"},
    {"lang": "en", "year": 2020, "flag": False, "source": "b"},
    {"lang": "de", "year": 2010, "score": 1, "source": "a"},
    {"lang": "en", "year": "2010", "flag": 1, "source": "c"},  # a number-like string, 1 for a bool
    {"year": 1999.5, "flag": 0},
    {},
    {"lang": "EN", "source": "b", "my-key": "x"},
    {"lang": "é", "year": 2000.0, "flag": 1.0, "my-key": 1},
    {"lang": "日本語", "year": 2000, "score": 1.0},
    {"lang": "\uffff", "year": INT64_MAX, "score": 0.1},
    {"lang": "\U0001f600", "year": INT64_MIN, "score": 0.30000000000000004},  # above U+FFFF
    {"lang": "", "year": 9.223372036854776e18, "score": 0.3},  # 2**63 as a float
    {"lang": 'say "hi"', "year": INT64_MAX - 1, "flag": "true"},
    {"lang": "back\\slash", "year": -(2**53) - 1, "source": "\\"},
    {"lang": "line\nbreak", "year": -0.0, "source": "\r"},
    {"lang": "tab\there", "year": 0, "source": "\n"},
    {"lang": "ctrl\x01byte\x7f", "year": 1e-300, "source": "'"},
    {"lang": INJECTION, "year": 5e-324, "source": '"'},
    {"lang": "it's", "year": -1, "source": "a b"},
    {"lang": 5, "year": True, "flag": "yes"},  # kinds swapped around
    {"lang": True, "year": False, "flag": "1"},
    {"lang": 0, "year": "", "flag": 2},
    {"lang": 1.5, "year": "abc", "score": "0.5"},
    {"lang": "en", "year": 2**53, "1st": "one"},
    {"lang": "en", "year": 2**53 + 1, "1st": 1},
    {"lang": "en ", "year": 2.5, "my-key": True},
    {"lang": "ENGLISH", "year": 1e16, "my-key": "x\u2028y"},  # a Unicode line separator
    {"lang": "de", "year": 2019.999999, "score": -0.5},
    {"lang": "fr", "year": -2005, "score": -1},
    {"lang": "zh", "year": 2021, "flag": False, "source": "b"},
    {"source": "a"},
    {"flag": True},
    {"lang": "de", "flag": True, "score": 0},
    {"lang": "en", "year": 2010.0, "flag": True, "score": 0.5, "source": "a"},
    {"lang": "\\n", "year": 2010, "source": "\\\\"},  # a backslash then n, not a line feed
    {"lang": "a\u0301", "year": 2000, "source": "á"},  # combining accent vs precomposed
    {"my-key": "", "1st": "", "year": -(2**63) + 1},
    {"lang": "Z", "year": -9.223372036854776e18},
    {"lang": "a", "year": 1},
    {"lang": "a\U0010ffff", "year": 1.0},
]

FIELDS = [*sorted({key for row in ROWS for key in row}), "absent"]


CASES: list[dict[str, object]] = [
    {"lang": "en"},
    {"lang": {"ne": "en"}},
    {"lang": {"in": ["en", "de"]}},
    {"lang": {"nin": ["en", "de"]}},
    {"lang": {"in": ["en"]}},
    {"lang": {"nin": ["en"]}},
    {"lang": {"gt": "en"}},
    {"lang": {"gte": "en"}},
    {"lang": {"lt": "en"}},
    {"lang": {"lte": "en"}},
    {"lang": {"gt": "\uffff"}},  # only a character beyond the BMP is greater
    {"lang": {"lt": "\U0001f600"}},
    {"lang": {"gte": "a", "lt": "b"}},
    {"lang": {"gt": ""}},
    {"lang": ""},
    {"lang": 'say "hi"'},
    {"lang": "back\\slash"},
    {"lang": "line\nbreak"},
    {"lang": "tab\there"},
    {"lang": "ctrl\x01byte\x7f"},
    {"lang": "\\n"},
    {"lang": "a\u0301"},
    {"lang": INJECTION},  # the whole injection is one string value
    {"lang": {"ne": INJECTION}},
    {"lang": 'x" or 1==1 or "'},  # must match nothing
    {"lang": "en\\"},  # a trailing backslash must not escape the closing quote
    {"source": {"in": ["\\", "\r", "\n", "'", '"', "\\\\"]}},
    {"source": {"nin": ["\\", "\r", "\n"]}},
    {"my-key": "x"},
    {"my-key": {"ne": "x"}},
    {"my-key": 1},
    {"my-key": True},
    {"1st": "one"},
    {"lang": 5},
    {"lang": True},
    {"lang": {"ne": True}},
    {"year": 2010},
    {"year": 2010.0},
    {"year": {"ne": 2010}},
    {"year": "2010"},
    {"year": {"gt": 2005}},
    {"year": {"gte": 2000, "lt": 2020}},
    {"year": {"lte": 2005}},
    {"year": {"gte": "2000"}},
    {"year": {"in": [2005, 2010, 2000.0]}},
    {"year": {"nin": [2005, 2010]}},
    {"year": {"in": [True]}},
    {"year": False},
    {"year": INT64_MAX},
    {"year": INT64_MIN},
    {"year": {"gte": INT64_MAX}},
    {"year": {"lte": INT64_MIN}},
    {"year": {"gt": INT64_MAX - 1}},
    {"year": 9.223372036854776e18},  # 2**63: not equal to INT64_MAX
    {"year": {"lt": 9.223372036854776e18}},
    {"year": {"gte": 9.223372036854776e18}},
    {"year": 2**53},
    {"year": 2**53 + 1},
    {"year": float(2**53)},
    {"year": 0},
    {"year": -0.0},
    {"year": {"gt": 0}},
    {"year": {"gt": 0.0, "lt": 1e-299}},
    {"year": 5e-324},
    {"year": {"lt": -(2**53)}},
    {"year": 1},
    {"score": 0.3},
    {"score": 0.30000000000000004},
    {"score": {"gt": 0.3}},
    {"score": 1},
    {"score": {"in": [0, 0.5]}},
    {"score": "0.5"},
    {"flag": True},
    {"flag": False},
    {"flag": 1},
    {"flag": {"ne": True}},
    {"flag": {"ne": 1}},
    {"flag": {"in": [True, False]}},
    {"flag": {"nin": [True, False]}},
    {"flag": {"nin": [True]}},
    {"flag": "true"},
    {"absent": "x"},
    {"absent": {"ne": "x"}},
    {"absent": {"nin": [1, 2]}},
    {"absent": {"gt": 0}},
    {"lang": "en", "source": "a"},
    {"lang": {"ne": "en"}, "flag": {"ne": True}},
    {"lang": {"nin": ["en", "de"]}, "year": {"gt": 1999}},
    {"lang": "de", "score": {"gte": 0}, "flag": True},
    {"lang": {"gte": "a"}, "year": {"ne": 2000}, "absent": {"nin": ["x"]}},
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusClient]:
    """One embedded Milvus Lite holding ROWS (id = index in ROWS), stopped after the module."""
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import DataType, MilvusClient

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    path = str(Path(tmp_path_factory.mktemp("milvus")) / "f.db")
    milvus = MilvusClient(path)
    schema = milvus.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("kinds", DataType.JSON)
    index = milvus.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="L2")
    milvus.create_collection(COLLECTION, schema=schema, index_params=index, consistency_level="Strong")
    rows = [
        {"id": i, "vector": [1.0, float(i)], "metadata": row, "kinds": milvus_kinds(row)}
        for i, row in enumerate(ROWS)
    ]
    half = len(rows) // 2
    milvus.insert(COLLECTION, rows[:half])
    milvus.flush(COLLECTION)  # half the rows in a sealed segment, half in the memtable: both are read
    milvus.insert(COLLECTION, rows[half:])
    yield milvus
    milvus.close()
    server_manager_instance.release_server(path)


def selected(client: MilvusClient, expr: str) -> list[int]:
    return sorted(row["id"] for row in client.query(COLLECTION, filter=expr, output_fields=["id"]))


def expected(f: MetadataFilter) -> list[int]:
    return [i for i, row in enumerate(ROWS) if f.matches(row)]


def test_rows_round_trip_through_milvus(client: MilvusClient) -> None:
    # The oracle runs on ROWS, Milvus on what it stored: they must be the same values and types.
    stored = client.query(COLLECTION, filter="id >= 0", output_fields=["id", "metadata", "kinds"])
    by_id = {row["id"]: row for row in stored}
    assert len(by_id) == len(ROWS)
    for i, row in enumerate(ROWS):
        got = by_id[i]["metadata"]
        assert json.dumps(got, sort_keys=True) == json.dumps(row, sort_keys=True)
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in row.items()}
        assert by_id[i]["kinds"] == milvus_kinds(row)


@pytest.mark.parametrize("raw", CASES, ids=[json.dumps(c, ensure_ascii=True) for c in CASES])
def test_milvus_selects_what_matches_selects(client: MilvusClient, raw: dict[str, object]) -> None:
    f = MetadataFilter.parse(raw)
    assert selected(client, f.to_milvus()) == expected(f)


def test_the_cases_discriminate() -> None:
    # A filter selecting no row or every row would pass against almost any translation: only the
    # injections and the absent field are meant to.
    trivial = [raw for raw in CASES if len(expected(MetadataFilter.parse(raw))) in (0, len(ROWS))]
    assert trivial == [
        {"lang": 'x" or 1==1 or "'},
        {"lang": "en\\"},
        {"absent": "x"},
        {"absent": {"ne": "x"}},
        {"absent": {"nin": [1, 2]}},
        {"absent": {"gt": 0}},
    ]


@pytest.mark.parametrize(
    ("naive", "raw"),
    [
        ('not (metadata["lang"] == "en")', {"lang": {"ne": "en"}}),  # NULL survives not
        ('metadata["flag"] == true', {"flag": True}),  # true == 1
        ('metadata["flag"] == 1', {"flag": 1}),
        ('metadata["year"] == 0', {"year": 0}),  # false == 0
    ],
)
def test_the_rows_expose_each_dialect_difference(
    client: MilvusClient, naive: str, raw: dict[str, object]
) -> None:
    # The plain translation gives other rows here, so the cases above would catch a missing guard.
    assert selected(client, naive) != expected(MetadataFilter.parse(raw))


def test_in_on_a_json_path_is_refused_by_milvus_lite(client: MilvusClient) -> None:
    from pymilvus import MilvusException

    with pytest.raises(MilvusException, match="left side of 'in' must be a field reference"):
        selected(client, 'metadata["lang"] in ["en", "de"]')


def test_string_literals_read_back_as_the_value() -> None:
    # Milvus Lite's own lexer turns each literal back into exactly the filter's string.
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    for value in [INJECTION, "\\", '\\"', "a\nb\rc\td", "\x01\u2028\U0010ffff", "'", ""]:
        expr = MetadataFilter.parse({"k": value}).to_milvus()
        strings = [t.value for t in tokenize(expr) if t.kind == TokenKind.STRING]
        assert strings == ["k", "k", "s", "k", value]


SAFE_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=6)
SCALARS = {
    "str": SAFE_TEXT,
    "num": st.one_of(st.integers(INT64_MIN, INT64_MAX), st.floats(allow_nan=False, allow_infinity=False)),
    "bool": st.booleans(),
}
ORDERED_KINDS = ["str", "num"]  # gt/gte/lt/lte take no boolean


@st.composite
def filters(draw: st.DrawFn) -> MetadataFilter:
    """1 to 3 conditions whose values often come from the rows (so that filters select some rows),
    else are arbitrary values of the chosen kind (odd characters, int64 bounds, subnormals)."""
    raw: dict[str, dict[str, object]] = {}
    for _ in range(draw(st.integers(1, 3))):
        field, op = draw(st.sampled_from(FIELDS)), draw(st.sampled_from(OPS))
        kinds = ORDERED_KINDS if op in ("gt", "gte", "lt", "lte") else list(SCALARS)
        seen = [v for row in ROWS if kind_of(v := row.get(field)) in kinds]
        kind = kind_of(draw(st.sampled_from(seen))) if seen else draw(st.sampled_from(kinds))
        pool = [v for v in seen if kind_of(v) == kind]
        scalar = st.one_of(st.sampled_from(pool), SCALARS[kind]) if pool else SCALARS[kind]
        value = draw(st.lists(scalar, min_size=1, max_size=4)) if op in ("in", "nin") else draw(scalar)
        raw.setdefault(field, {})[op] = value
    return MetadataFilter.parse(raw)


@settings(max_examples=150, deadline=None)
@given(f=filters())
def test_generated_filters_agree(client: MilvusClient, f: MetadataFilter) -> None:
    assert selected(client, f.to_milvus()) == expected(f)
