"""How the stream consumer treats a failure: by what will happen if it tries again.

- **transient** (:class:`~schemas.errors.RetryableError`, which ``cluster/`` raises for a dead,
  restarting or silent actor, and the store for a full disk or a locked file;
  :class:`~schemas.errors.IndexUnavailableError`, a shard that cannot serve until its data is back;
  ``TimeoutError``; ``OSError``; SQLite's operational errors): retry with capped exponential
  back-off, without limit, visibly (a counter per phase and the stalled phase in the consumer's
  stats).
- **permanent** (``ValueError`` and its kin ``UnicodeError`` and
  :class:`~schemas.errors.ProcessingError``; ``TypeError``; ``OverflowError``; SQLite's integrity
  and binding errors): the same data fails the same way again, so the consumer isolates the
  record that causes it and dead-letters it as ``processing_error``.
- **unknown** (anything else): retried :data:`UNKNOWN_ATTEMPTS` times, then treated as permanent,
  so an unforeseen bug can neither stop a partition for good nor drop a record silently (its
  dead letter keeps the bytes and the error). Where no record can be blamed (reading what the
  shards hold, writing dead letters or offsets), it is retried like a transient one.

A Ray task error arrives as an instance of its cause's class too, so it is classified by cause.
"""

from __future__ import annotations

import sqlite3
from typing import Literal

from schemas.errors import IndexUnavailableError, RetryableError

Failure = Literal["transient", "permanent", "unknown"]
UNKNOWN_ATTEMPTS = 3
_PERMANENT = (
    ValueError,
    TypeError,
    OverflowError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
)


def classify(exc: BaseException) -> Failure:
    """``transient``, ``permanent`` or ``unknown`` (see the module's docstring)."""
    if isinstance(exc, RetryableError | IndexUnavailableError | TimeoutError | ConnectionError):
        return "transient"
    if isinstance(exc, sqlite3.OperationalError):  # locked, busy, I/O: a read may fail so too
        return "transient"
    if isinstance(exc, _PERMANENT):
        return "permanent"
    if isinstance(exc, OSError):
        return "transient"
    return "unknown"


class Backoff:
    """Capped exponential delays: ``initial_s``, doubled each time, at most ``max_s``."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 10.0) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self._next = initial_s

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.max_s)
        return delay
