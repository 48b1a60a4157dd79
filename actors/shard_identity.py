"""Which store a shard directory holds, and whether it holds what the consumer group committed.

A shard directory is node-local. If a shard restarts on a node without its data (or its data is
lost), opening there would silently create an empty store while the group's committed offsets
stay ahead of it: the documents before them would never be read again. Every committed batch
first writes its offsets to every shard, so a shard's applied offsets are never behind the
group's committed ones; a shard that finds them behind knows its data is elsewhere, and refuses
to serve or write (see :func:`committed_problem`).

``<shard dir>/IDENTITY.json`` (:class:`StoreIdentity`) is written when the store is created: it
tells an operator (and the shard) which index, shard, model and store the directory holds, and
where it was created.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.topology import Offsets

log = logging.getLogger(__name__)

IDENTITY_NAME = "IDENTITY.json"


@dataclass(frozen=True)
class StoreIdentity:
    """What a shard directory holds. ``created``: ISO 8601, UTC; ``host``: where it was created."""

    index: str
    shard: int
    model: str
    dim: int
    store_id: str
    host: str
    created: str

    @classmethod
    def new(cls, index: str, shard: int, model: str, dim: int, store_id: str) -> StoreIdentity:
        """The identity of a store created now, on this host."""
        created = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(index, shard, model, dim, store_id, socket.gethostname(), created)


def read_identity(directory: Path) -> StoreIdentity | None:
    """The identity recorded in ``directory``; None when there is none or it cannot be read (a
    torn or hand-edited file is logged and treated as absent: the store, not this file, holds
    the data)."""
    path = directory / IDENTITY_NAME
    try:
        return StoreIdentity(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s is unreadable (%s); it will be written again", path, exc)
        return None


def write_identity(directory: Path, identity: StoreIdentity) -> None:
    """Writes ``directory/IDENTITY.json`` atomically (a crash leaves the old file or the new)."""
    path, tmp = directory / IDENTITY_NAME, directory / f"{IDENTITY_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(identity), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def identity_problem(identity: StoreIdentity, index: str, shard: int, directory: Path) -> str | None:
    """Why the directory of shard ``shard`` of ``index`` must not be used, when its identity says it
    belongs to another shard or index (``index`` is compared only when both are named)."""
    other_index = bool(index and identity.index and identity.index != index)
    if identity.shard == shard and not other_index:
        return None
    return (
        f"shard {shard} of index {index or '?'!r}: {directory} holds shard {identity.shard} of index "
        f"{identity.index or '?'!r} (store {identity.store_id}, created on {identity.host} at "
        f"{identity.created}); put that directory back where it belongs, or point this shard at its own"
    )


@contextmanager
def read_only(store_file: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection to the SQLite file ``store_file`` (None when there is no such
    file), for reading a store without opening it for writing or taking its directory's lock;
    closed on exit. It waits up to 10 s for a writer's transaction."""
    if not store_file.is_file():
        yield None
        return
    conn = sqlite3.connect(f"{store_file.absolute().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        yield conn
    finally:
        conn.close()


def applied_offsets(store_file: Path) -> Offsets | None:
    """The offsets a store file records as applied, read without opening it for writing (any
    schema version); None when there is no store file."""
    with read_only(store_file) as conn:
        if conn is None:
            return None
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'offsets'")
        if exists.fetchone() is None:
            return {}
        offsets: Offsets = {}
        for topic, partition, offset in conn.execute("SELECT topic, partition, next_offset FROM offsets"):
            offsets.setdefault(topic, {})[int(partition)] = int(offset)
        return offsets


def offsets_complete(store_file: Path) -> bool:
    """Whether the store's applied offsets can be trusted to cover everything committed: true for
    stores written by schema 2 on, which record every committed batch's offsets on every shard.
    Older riverbeds committed batches of only dead letters or unchanged documents without telling
    the shards, so their stores may lag the group's offsets with nothing lost."""
    conn = sqlite3.connect(f"{store_file.absolute().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
    return row is not None and int(row[0]) >= 2


def offsets_behind(applied: Offsets, committed: Offsets) -> Offsets:
    """The committed offsets of the partitions where ``committed`` is ahead of ``applied``
    (a partition missing from ``applied`` is at 0)."""
    behind: Offsets = {}
    for topic, partitions in committed.items():
        for partition, offset in partitions.items():
            if offset > applied.get(topic, {}).get(partition, 0):
                behind.setdefault(topic, {})[partition] = offset
    return behind


def committed_problem(
    index: str, shard: int, directory: Path, applied: Offsets | None, committed: Offsets
) -> str | None:
    """Why shard ``shard`` must not open the store in ``directory``: the consumer group committed
    offsets past what the store has applied (``applied`` None: there is no store). None: it may."""
    behind = offsets_behind(applied or {}, committed)
    if not behind:
        return None
    holds = "no store" if applied is None else f"a store that applied offsets {_show(applied)}"
    return (
        f"shard {shard} of index {index or '?'!r} at {directory} on {socket.gethostname()} holds {holds}, "
        f"but the consumer group committed {_show(committed)} (ahead on {_show(behind)}): its data is on "
        f"another node or was lost, so it neither serves nor writes rather than answer from an "
        f"incomplete store. Start the shard on the node that holds its directory; or, to rebuild the "
        f"index from the topic, delete the index's data directories and its consumer group's "
        f"offsets, then ingest again"
    )


def _show(offsets: Offsets) -> str:
    return json.dumps({t: {str(p): o for p, o in sorted(ps.items())} for t, ps in sorted(offsets.items())})
