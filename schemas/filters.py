"""Metadata filters for search, as sent in the ``filter`` of an HTTP search request:

    {"lang": "en", "year": {"gte": 2000, "lt": 2020}, "source": {"in": ["a", "b"]}}

Every top-level key is a metadata field; a bare value means ``eq``; a dict holds one or more
operators (``eq ne gt gte lt lte in nin``), all of which must hold. Conditions are ANDed.

Semantics, identical in :meth:`MetadataFilter.matches`, :meth:`MetadataFilter.to_sql` (SQLite JSON)
and :meth:`MetadataFilter.to_milvus` (a Milvus boolean expression):

- Values are of three kinds: strings, numbers (int and float compare numerically, ``1 == 1.0``)
  and booleans. A condition only holds between values of the same kind: ``{"year": 2000}`` does
  not match ``"year": "2000"``, and ``true`` is not ``1``. Strings order by code point.
- A value is what a record's metadata may hold (:mod:`schemas.metadata`): a string without a lone
  surrogate, an integer within int64, a finite float, a boolean. Anything else is refused naming the
  field, since no store could compare it.
- A missing field (or one of another kind) fails ``eq gt gte lt lte in``.
- ``ne`` is exactly ``not eq`` and ``nin`` is exactly ``not in``: so they *match* a document that
  lacks the field ("not in English" is true of a document with no ``lang``), as in MongoDB.

Milvus's own rules differ from these (a missing key is NULL and NULL survives ``not``; ``true == 1``
holds; ``in`` takes no JSON path in Milvus Lite), so its translation leans on a second JSON field
written beside the metadata, :func:`milvus_kinds`; :meth:`MetadataFilter.to_milvus` says how.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from schemas.metadata import value_problem

Scalar = str | int | float | bool
StrictScalar = StrictStr | StrictBool | StrictInt | StrictFloat
Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
Kind = Literal["str", "num", "bool"]

OPS: tuple[Op, ...] = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
_OPS_BY_NAME: dict[str, Op] = {op: op for op in OPS}
_SQL_OPS = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
# Letters, digits, "_" and "-": safe both as a JSON-path label and in error messages.
FIELD_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
_COLUMN_PATTERN = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]{0,63}\.)?[A-Za-z_][A-Za-z0-9_]{0,63}$"
)  # [table.]column
MAX_IN_VALUES = 1024  # far below SQLite's bound-parameter limit (32766)
_MILVUS_KINDS: dict[Kind, str] = {"str": "s", "num": "n", "bool": "b"}
_MILVUS_OPS = {"eq": "==", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_MILVUS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
# Words the expression lexer reads as keywords or literals, in any case: never a field name.
_MILVUS_RESERVED = frozenset(
    {"and", "or", "not", "in", "like", "is", "null", "exists", "iso", "interval", "true", "false"}
)
# In a string literal a raw line break is a syntax error, and a quote or backslash would end or escape it.
_MILVUS_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def kind_of(value: object) -> Kind | None:
    """The comparison kind of a metadata value, or None for anything that is not a scalar."""
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "bool"
    if isinstance(value, int | float):
        return "num"
    if isinstance(value, str):
        return "str"
    return None


def milvus_kinds(metadata: Mapping[str, object]) -> dict[str, str]:
    """The ``kinds`` JSON a Milvus row carries beside its ``metadata``: for each key, the kind of its
    value, ``"s"`` (string), ``"n"`` (number, int or float) or ``"b"`` (boolean). A key whose value
    is no scalar is left out, so that every condition treats it as missing, as :meth:`matches` does
    (its kind never equals a condition's)."""
    kinds = {key: kind_of(value) for key, value in metadata.items()}
    return {key: _MILVUS_KINDS[kind] for key, kind in kinds.items() if kind is not None}


def _scalar_kind(value: Scalar) -> Kind:
    if isinstance(value, bool):
        return "bool"
    return "str" if isinstance(value, str) else "num"


class Condition(BaseModel):
    """One ``field op value`` test, validated however it is built. ``value`` is a non-empty tuple
    of one kind for ``in``/``nin``, a single scalar otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    op: Op
    value: StrictScalar | tuple[StrictScalar, ...]

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            field, op = data.get("field"), data.get("op")
            _check_field(field)
            checked = _check_op(field, op)
            return {**data, "value": _check_value(str(field), checked, data.get("value"))}
        return data

    @property
    def values(self) -> tuple[Scalar, ...]:
        return self.value if isinstance(self.value, tuple) else (self.value,)

    def matches(self, metadata: Mapping[str, object]) -> bool:
        if self.op in ("ne", "nin"):
            return not self._negated().matches(metadata)
        got = metadata.get(self.field)
        if kind_of(got) != _scalar_kind(self.values[0]):  # also False when missing
            return False
        if self.op == "in":
            return got in self.values
        return bool(_PY_OPS[self.op](got, self.value))

    def to_sql(self, column: str) -> tuple[str, list[Scalar]]:
        """A SQL expression that is never NULL, and its parameters (path and values are bound)."""
        if self.op in ("ne", "nin"):
            sql, params = self._negated().to_sql(column)
            return f"NOT ({sql})", params
        path = f'$."{self.field}"'  # _check_field excludes quotes, so this label is exact
        kind = _scalar_kind(self.values[0])
        json_type = f"ifnull(json_type({column}, ?), '')"
        if kind == "bool":  # json_type tells true from false; json_extract would say 1 or 0
            wanted = sorted({"true" if v else "false" for v in self.values})
            return f"{json_type} IN ({_marks(len(wanted))})", [path, *wanted]
        types = ("text",) if kind == "str" else ("integer", "real")
        if self.op == "in":
            value_sql = f"json_extract({column}, ?) IN ({_marks(len(self.values))})"
        else:
            value_sql = f"json_extract({column}, ?) {_SQL_OPS[self.op]} ?"
        sql = f"({json_type} IN ({_marks(len(types))}) AND {value_sql})"
        return sql, [path, *types, path, *self.values]

    def to_milvus(self, column: str = "metadata", kinds: str = "kinds") -> str:
        """A parenthesised Milvus expression that is true or false, never NULL, on every row whose
        ``kinds`` was written by :func:`milvus_kinds` from its ``column`` (see
        :meth:`MetadataFilter.to_milvus`)."""
        _check_milvus_names(column, kinds)
        if self.op in ("ne", "nin"):
            return f"(not {self._negated().to_milvus(column, kinds)})"
        key = milvus_literal(self.field)
        kind = milvus_literal(_MILVUS_KINDS[_scalar_kind(self.values[0])])
        path = f"{column}[{key}]"
        if self.op == "in":  # Milvus Lite refuses a JSON path left of ``in``
            test = " or ".join(f"{path} == {milvus_literal(v)}" for v in self.values)
            test = f"({test})" if len(self.values) > 1 else test
        else:
            test = f"{path} {_MILVUS_OPS[self.op]} {milvus_literal(self.values[0])}"
        return f"(exists {kinds}[{key}] and {kinds}[{key}] == {kind} and {test})"

    def _negated(self) -> Condition:
        """The condition that ``ne``/``nin`` negate (built unvalidated: self is already valid)."""
        op: Op = "eq" if self.op == "ne" else "in"
        return Condition.model_construct(field=self.field, op=op, value=self.value)


class MetadataFilter(BaseModel):
    """A parsed, validated filter. Build it with :meth:`parse` or pydantic validation of the raw
    filter syntax above (so an HTTP request model may declare ``filter: MetadataFilter | None``).

    Bad input raises ``ValueError`` (pydantic's ``ValidationError`` is one) naming the field and
    the reason. An empty filter matches everything.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    conditions: tuple[Condition, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _from_raw(cls, data: Any) -> Any:
        # The raw syntax never has a list as a field's value, so {"conditions": [...]} is the
        # structured form (model_dump output) and anything else is raw, even a field "conditions".
        if isinstance(data, Mapping) and not (
            set(data) == {"conditions"} and isinstance(data["conditions"], list | tuple)
        ):
            return {"conditions": _parse(data)}
        return data

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> MetadataFilter:
        """Parses the raw syntax; raises ``ValueError`` naming the field and the reason."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a filter must be a JSON object, got {type(raw).__name__}")
        return cls.model_construct(conditions=_parse(raw))

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(c.field for c in self.conditions)

    def matches(self, metadata: Mapping[str, object]) -> bool:
        """Whether ``metadata`` satisfies every condition (see the module doc for kinds)."""
        return all(c.matches(metadata) for c in self.conditions)

    def to_sql(self, column: str = "metadata") -> tuple[str, list[Scalar]]:
        """A WHERE expression over a JSON-object ``column``, with ``?`` placeholders and their
        parameters. No value or field name is ever interpolated into the SQL text."""
        if not _COLUMN_PATTERN.match(column):
            raise ValueError(f"unsafe column name {column!r}")
        if not self.conditions:
            return "1", []
        parts: list[str] = []
        params: list[Scalar] = []
        for condition in self.conditions:
            sql, p = condition.to_sql(column)
            parts.append(sql)
            params.extend(p)
        return " AND ".join(parts), params

    def to_milvus(self, column: str = "metadata", kinds: str = "kinds") -> str:
        """A Milvus boolean expression selecting exactly the rows whose JSON field ``column`` holds
        metadata that :meth:`matches`, or ``""`` for an empty filter (pass no filter then). Every
        row must also hold the JSON field ``kinds``, written by :func:`milvus_kinds` from the same
        metadata. Conditions are ANDed, each in parentheses. ``column`` and ``kinds`` must be plain
        field names; field names and values come from a validated filter and are written as
        escaped literals, so no value can change the expression's structure.

        Milvus's expression dialect (checked against Milvus Lite 3.2.2) differs from the semantics
        above in four ways, each handled here:

        - *A missing JSON key is NULL*, and NULL survives ``not``: ``not (metadata["lang"] ==
          "en")`` leaves out a document without ``lang``, which ``ne`` must select. So each
          condition opens with ``exists kinds["f"]``, which is plainly false for a missing key;
          with it every condition is two-valued, and ``ne``/``nin`` are exactly ``not (eq)`` and
          ``not (in)``.
        - *Kinds blur*: ``true == 1`` holds, and an ordering against another kind yields NULL. Each
          condition tests ``kinds["f"] == "s"`` (or ``"n"``, ``"b"``) before the value, so it only
          compares values of one kind, as :meth:`matches` does. Numbers compare exactly across int
          and float (``1 == 1.0``; ``2**63 - 1 < 9.223372036854776e18``) and strings by code point,
          as in Python.
        - *No ``in`` on a JSON path* (a parse error in Milvus Lite): ``in`` becomes ``==`` tests
          joined by ``or``.
        - *No filter templates* in Milvus Lite, so values are literals: strings in double quotes
          with ``\\``, ``"``, line feed and carriage return escaped (the lexer takes every other
          character as it is, and refuses a raw line break); floats by ``repr`` (exact round trip),
          integers in decimal, booleans as ``true``/``false``. Keys are written the same way, as
          ``metadata["my-key"]``.
        """
        _check_milvus_names(column, kinds)
        return " and ".join(c.to_milvus(column, kinds) for c in self.conditions)

    def to_raw(self) -> dict[str, Any]:
        """The filter back in the raw syntax (``parse(f.to_raw()) == f``)."""
        raw: dict[str, dict[str, Any]] = {}
        for c in self.conditions:
            raw.setdefault(c.field, {})[c.op] = list(c.value) if isinstance(c.value, tuple) else c.value
        return raw


def _parse(raw: Mapping[Any, Any]) -> tuple[Condition, ...]:
    conditions: list[Condition] = []
    for field, spec in raw.items():
        _check_field(field)
        ops = spec if isinstance(spec, Mapping) else {"eq": spec}
        if not ops:
            raise ValueError(f"filter field {field!r}: no operator given (use one of {', '.join(OPS)})")
        for name, raw_value in ops.items():
            op = _check_op(field, name)  # checked here rather than by Condition: plainer messages
            value = _check_value(field, op, raw_value)
            conditions.append(Condition.model_construct(field=field, op=op, value=value))
    return tuple(conditions)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _check_milvus_names(column: str, kinds: str) -> None:
    for name in (column, kinds):
        if not _MILVUS_NAME.match(name) or name.lower() in _MILVUS_RESERVED:
            raise ValueError(
                f"unsafe Milvus field name {name!r} (letters, digits and '_', no leading digit, no keyword)"
            )
    if column == kinds:
        raise ValueError(f"the metadata and kinds fields must differ, both are {column!r}")


def milvus_literal(value: Scalar) -> str:
    """``value`` as a literal of the Milvus expression language (see MetadataFilter.to_milvus)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.translate(_MILVUS_ESCAPES) + '"'
    return repr(value)  # int: decimal; float: shortest text that reads back as the same float


def _check_field(field: object) -> None:
    if not isinstance(field, str) or not FIELD_PATTERN.match(field):
        raise ValueError(
            f"filter field {field!r}: names must match {FIELD_PATTERN.pattern} (letters, digits, '_' and '-')"
        )


def _check_op(field: object, name: object) -> Op:
    op = _OPS_BY_NAME.get(name) if isinstance(name, str) else None
    if op is None:
        raise ValueError(f"filter field {field!r}: unknown operator {name!r} (use one of {', '.join(OPS)})")
    return op


def _check_value(field: str, op: str, value: object) -> Scalar | tuple[Scalar, ...]:
    where = f"filter field {field!r}, operator {op!r}"
    if op in ("in", "nin"):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: needs a list of values, got {type(value).__name__}")
        if not value:
            raise ValueError(f"{where}: the list is empty (it would match nothing, or everything)")
        if len(value) > MAX_IN_VALUES:
            raise ValueError(f"{where}: {len(value)} values, at most {MAX_IN_VALUES} allowed")
        items = tuple(_check_scalar(where, v) for v in value)
        if len({_scalar_kind(v) for v in items}) > 1:
            raise ValueError(f"{where}: the list mixes strings, numbers and booleans")
        return items
    scalar = _check_scalar(where, value)
    if op not in ("eq", "ne") and isinstance(scalar, bool):
        raise ValueError(f"{where}: needs a number or a string, got a boolean")
    return scalar


def _check_scalar(where: str, value: object) -> Scalar:
    if not isinstance(value, str | int | float):  # bool is an int
        hint = " (use {'in': [...]} for a list)" if isinstance(value, list | tuple) else ""
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"{where}: needs a string, number or boolean, got {got}{hint}")
    if (problem := value_problem(value)) is not None:  # a value no record's metadata can hold
        raise ValueError(f"{where}: {problem}")
    return value
