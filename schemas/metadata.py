"""What a record may hold, checked once at every edge (Kafka records, HTTP bodies, shard writes).

- ``metadata`` values are strings, booleans, integers within int64, or finite floats: anything
  else could not be stored and filtered the same way by every backend (SQLite binds int64 only;
  NaN breaks ordering and JSON).
- No string anywhere holds a lone surrogate (``"\\ud800"``): it cannot be encoded as UTF-8, so no
  store, tokenizer or Kafka producer can take it. JSON allows it as an escape; we refuse it.
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
            return f"integer {value} is outside the 64-bit range [{INT64_MIN}, {INT64_MAX}]"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, str):
        return string_problem(value)
    return f"must be a string, number or boolean, got {type(value).__name__}"


def metadata_problem(metadata: Mapping[Any, object]) -> str | None:
    """The first reason ``metadata`` cannot be stored, naming the key (``metadata.<key>: ...``)."""
    for key, value in metadata.items():
        if not isinstance(key, str):
            return f"metadata key {key!r} must be a string"
        if (problem := string_problem(key)) is not None:
            return f"metadata key {key!r} {problem}"
        if (problem := value_problem(value)) is not None:
            return f"metadata.{key}: {problem}"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use null or a finite number)")


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` literals and numbers that overflow to
    infinity (``1e999``), raising ``ValueError`` (a ``json.JSONDecodeError`` for malformed text)."""

    def parse_float(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(f"number {raw} is too large to represent")
        return value

    return json.loads(text, parse_constant=_refuse_constant, parse_float=parse_float)
