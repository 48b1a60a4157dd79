"""Errors grouped by what the caller does with them.

- :class:`ConfigError`: fail at start, the message names the setting.
- :class:`RetryableError`: back off and try again (broker or shard briefly unavailable).
- :class:`StorageFullError` (retryable): a store is full; retried until space returns.
- :class:`PoisonMessageError`: this record can never be processed: dead-letter it and move on.
- :class:`ProcessingError` (a ``ValueError``): a valid record whose data cannot be stored; the
  stream consumer dead-letters it alone (``processing_error``) and writes the rest of its batch.
- :class:`IndexUnavailableError`: the index cannot answer now (HTTP 503).
- :class:`InvalidRequestError`: the request is wrong (HTTP 400); ``param`` names the field.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

DeadLetterReason = Literal[
    "invalid_json",
    "invalid_envelope",
    "too_large",
    "bad_encoding",
    "key_mismatch",
    "processing_error",
    "invalid_image",
]
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)


class RiverbedError(Exception):
    """Base of every error Riverbed raises on purpose."""


class ConfigError(RiverbedError):
    """The configuration or environment is wrong; fix it and start again."""


class RetryableError(RiverbedError):
    """A transient failure: the same call may succeed after a back-off."""


class PoisonMessageError(RiverbedError):
    """A record that can never be processed; it goes to the dead-letter topic with ``reason``."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(message)
        self.reason: DeadLetterReason = reason


class StorageFullError(RetryableError):
    """A store has no space left (the disk, or its configured quota): writes wait and are retried
    until space returns; the shard's health says so meanwhile."""


class ProcessingError(RiverbedError, ValueError):
    """A record passed validation but its data cannot be processed or stored (a constraint, a value
    the store cannot bind, a non-finite vector). Permanent: the record is dead-lettered as
    ``processing_error`` and the rest of its batch goes on."""


class IndexUnavailableError(RiverbedError):
    """The index (a shard, the store) cannot serve now; HTTP answers 503."""


class InvalidRequestError(RiverbedError, ValueError):
    """A query or request that can never succeed as sent (HTTP 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFoundError(RiverbedError):
    """What a request names does not exist (HTTP 404); ``param`` names the field that named it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.param))


class KafkaSetupError(ConfigError):
    """The embedded broker cannot be fetched, formatted or started; the message says how to fix it."""
