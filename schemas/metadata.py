"""What a record may hold, checked once at every edge (Kafka records, HTTP bodies, shard writes).

- ``metadata`` values are strings, booleans, integers within int64, or finite floats: anything
  else could not be stored and filtered the same way by every backend (SQLite binds int64 only;
  NaN breaks ordering and JSON).
- No string anywhere holds a lone surrogate (``"\\ud800"``): it cannot be encoded as UTF-8, so no
  store, tokenizer or Kafka producer can take it. JSON allows it as an escape; we refuse it.
- No metadata key or string value holds NUL (U+0000): SQLite's JSON functions, which the FAISS
  backend's filters run on, end a string there, so a filter would see another value than the one
  stored. Text and titles may hold it.
- JSON is parsed strictly: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON, though Python's
  parser accepts them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

MetadataValue = str | bool | int | float
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def string_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored (it holds a lone surrogate), or None."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return f"holds a lone surrogate (U+{ord(found.group()):04X}) at position {found.start()}"


def value_problem(value: object) -> str | None:
    """Why ``value`` is not a valid metadata value, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"integer {_abbreviated(value)} is outside the 64-bit range [{INT64_MIN}, {INT64_MAX}]"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, str):
        return string_problem(value) or _nul_problem(value)
    return f"must be a string, number or boolean, got {type(value).__name__}"


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a metadata key, or None."""
    return string_problem(key) or _nul_problem(key)


def _nul_problem(value: str) -> str | None:
    at = value.find("\x00")
    return None if at < 0 else f"holds NUL (U+0000) at position {at}, which metadata cannot store"


def _abbreviated(value: int) -> str:
    """``value`` in decimal, or its size when huge: the message travels in headers and logs, and
    Python refuses to print integers of more than 4300 digits."""
    return str(value) if value.bit_length() <= 128 else f"of {value.bit_length()} bits"


def metadata_problem(metadata: Mapping[Any, object]) -> str | None:
    """The first reason ``metadata`` cannot be stored, naming the key (``metadata.<key>: ...``)."""
    for key, value in metadata.items():
        if not isinstance(key, str):
            return f"metadata key {key!r} must be a string"
        if (problem := key_problem(key)) is not None:
            return f"metadata key {key!r} {problem}"
        if (problem := value_problem(value)) is not None:
            return f"metadata.{key}: {problem}"
    return None


def printable(text: str) -> str:
    """``text`` with each lone surrogate written as an escape (``\\ud800``), so that a message
    quoting bad input can itself be encoded (log files, Kafka headers, HTTP bodies)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _NotFinite(ValueError):
    """A JSON text holds a number that is not finite (a ``NaN``/``Infinity`` literal, or ``1e999``)."""


def _refuse_constant(name: str) -> Any:
    raise _NotFinite(f"{name} is not valid JSON (use null or a finite number)")


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise _NotFinite(f"number {raw} is too large to represent")
    return value


def _non_finite_path(value: Any, path: str) -> str | None:
    """The path (``metadata.year``, ``items[2]``) of the first non-finite float in ``value``."""
    if isinstance(value, float):
        return path if not math.isfinite(value) else None
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for child_path, item in children:
        if (found := _non_finite_path(item, child_path)) is not None:
            return found
    return None


def _where_non_finite(text: str | bytes) -> str | None:
    """Where the first non-finite number of ``text`` sits, found by a lenient second parse (only
    for texts already refused, so its cost never touches valid records); None if unknown."""
    try:
        return _non_finite_path(json.loads(text), "") or None
    except (ValueError, RecursionError):
        return None


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` literals and numbers that overflow to
    infinity (``1e999``), raising ``ValueError`` that names the field holding it
    (``metadata.score: NaN is not valid JSON ...``); malformed text raises ``json.JSONDecodeError``
    (a ``ValueError`` too)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        where = _where_non_finite(text)
        raise ValueError(printable(f"{where}: {exc}") if where else str(exc)) from exc
