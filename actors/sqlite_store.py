"""What a shard's SQLite store does the same whatever it holds (vectors and text in
:class:`~actors.shard_store.ShardStore`, graph facts in :class:`~actors.graph_store.GraphStore`):

- one writer per directory: a lock file (``flock``) held from open to close, naming its process;
- WAL, full sync, a busy timeout; one connection, shared by threads under one lock;
- write transactions that take the write lock at once, roll back on any failure and raise the
  failure as the kind its caller acts on (:func:`~actors.store_write.classify`);
- the committed offsets (``{topic: {partition: next offset}}``) and closing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from actors.store_write import classify
from schemas.errors import ConfigError, IndexUnavailableError, RetryableError
from schemas.topology import Offsets


class SQLiteStore:
    """The connection of one store directory; subclasses open it with :meth:`_connect` (writable)
    or their own read-only connection, and name themselves in errors with ``where``."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._lock = threading.RLock()
        self._lock_file: IO[str] | None = None
        self._max_bytes: int | None = None

    def _connect(self, directory: Path, db_name: str) -> None:
        """Locks ``directory`` (creating it) and opens ``db_name`` there for writing."""
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = lock_directory(directory)
        self._conn = sqlite3.connect(directory / db_name, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode = WAL", "synchronous = FULL", "busy_timeout = 10000"):
            self._conn.execute(f"PRAGMA {pragma}")

    @contextmanager
    def _opening(self) -> Iterator[None]:
        """Around opening: what it opened is closed when it fails, and a file that is no usable
        database raises IndexUnavailableError."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            self.close()
            raise IndexUnavailableError(f"{self._where}: cannot open the store: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def offsets(self) -> Offsets:
        """``{topic: {partition: next_offset}}`` covered by committed writes."""
        result: Offsets = {}
        with self._lock:
            for topic, partition, offset in self._conn.execute("SELECT * FROM offsets"):
                result.setdefault(topic, {})[partition] = offset
        return result

    def close(self) -> None:
        """Closes the connection and releases the writer lock. Idempotent."""
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
                del self._conn
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction; on any failure it is rolled back and the error classified."""
        if self._lock_file is None:
            raise ConfigError(f"{self._where}: opened read-only, cannot write")
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                self._conn.execute("ROLLBACK")
            error = classify(exc, self._where, self._max_bytes)
            if error is exc:
                raise
            raise error from exc


def lock_directory(directory: Path) -> IO[str]:
    """Takes the writer lock of ``directory`` (its ``LOCK`` file, which names the holder's pid);
    RetryableError naming the holder when another process has it."""
    handle = open(directory / "LOCK", "a+")  # noqa: SIM115  # held open until close()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RetryableError(
            f"shard {directory} is open by another writer (pid {holder}); retry once it has closed"
        ) from exc
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
