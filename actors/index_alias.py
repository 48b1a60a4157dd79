"""Index aliases: a name that points at one index, switched atomically.

An app serving ``index.alias`` answers from whichever index the alias points at, and follows it
when it moves (``riverbed index alias ALIAS --to INDEX``): a new model goes live by building its
index beside the served one (``riverbed index reindex``) and then moving the alias.

Each alias is one small JSON file, ``<home>/state/aliases/<alias>.json`` (``{"alias", "index",
"previous", "set_at"}``), replaced with ``os.replace``: a reader sees the old target or the new
one, never a torn write. The home is shared by every process of a deployment (one machine, or the
pods' shared volume), so every replica sees the same alias.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError

ALIAS_DIR = "aliases"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def alias_path(state_dir: Path, alias: str) -> Path:
    if not _NAME.match(alias):
        raise ConfigError(f"alias {alias!r}: use 1-64 letters, digits, '.', '_' or '-' (not first)")
    return state_dir / ALIAS_DIR / f"{alias}.json"


def read_alias(state_dir: Path, alias: str) -> str | None:
    """The index ``alias`` points at, or None when it points nowhere yet."""
    record = alias_record(state_dir, alias)
    return None if record is None else str(record["index"])


def alias_record(state_dir: Path, alias: str) -> dict[str, Any] | None:
    """``alias``'s file (``{"alias", "index", "previous", "set_at"}``), or None when there is none."""
    path = alias_path(state_dir, alias)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"alias file {path} cannot be read: {exc}") from exc
    index = data.get("index") if isinstance(data, dict) else None
    if not isinstance(index, str) or not index:
        raise ConfigError(f"alias file {path} names no index")
    return dict(data)


def write_alias(state_dir: Path, alias: str, index: str) -> str | None:
    """Points ``alias`` at ``index`` (atomically); returns the index it pointed at before."""
    path = alias_path(state_dir, alias)
    previous = read_alias(state_dir, alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    record = {"alias": alias, "index": index, "previous": previous, "set_at": time.time()}
    staging.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return previous


def list_aliases(state_dir: Path) -> dict[str, str]:
    """Every alias and the index it points at."""
    folder = state_dir / ALIAS_DIR
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        index = read_alias(state_dir, path.stem)
        if index is not None:
            found[path.stem] = index
    return found
