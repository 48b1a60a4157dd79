"""Connections to Milvus for the Milvus backend, what its failures mean to a caller, and the
durability of Milvus Lite's files.

- :func:`connect` opens a dedicated client (its own gRPC channel, closed with it) to a server, or
  to Milvus Lite on a shard's data dir. Lite runs one server per data dir in this process; the
  objects using it are counted, and the last one to release it stops it (which closes and
  unlocks the data dir for other processes).
- :func:`error_class` says which Riverbed error a failure of a call is, by what a caller should
  do: :class:`RetryableError` when Milvus cannot answer now (unreachable, timing out, not ready,
  overloaded, rate limited, a collection loading or recovering), :class:`StorageFullError` when
  it refuses writes for want of memory, disk or quota (retried until space returns, the shard
  degraded meanwhile), :class:`ProcessingError` for a request it says is wrong (an input error)
  or a message over a gRPC size limit; None otherwise.
- :class:`LiteFiles` fsyncs what Milvus Lite wrote, which it does not itself (see there).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from actors.milvus_layout import DB_NAME
from schemas.errors import ConfigError, ProcessingError, RetryableError, RiverbedError, StorageFullError
from schemas.settings import MilvusConfig

__all__ = ["LiteFiles", "connect", "error_class", "is_milvus_lite", "milvus_code", "release_lite"]

# gRPC codes of a call that may succeed later (RESOURCE_EXHAUSTED unless a message is too large).
_RETRY_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
# Milvus's status codes (its ``merr`` package). Retried: service unavailable (2), too many requests
# (4), rate limited (8), resources short (12), collection not loaded (101), not fully loaded (103),
# recovering (106), replica (401) or channel (503) not available, channel stalled (505). Code 1,
# "service not ready" on a server (which marks it retriable), is also pymilvus's code for its own
# client-side errors and Milvus Lite's for any unexpected one: never retried by code alone.
_RETRY_CODES = {2, 4, 8, 12, 101, 103, 106, 401, 503, 505}
_FULL_CODES = {3, 7, 9}  # memory limit, disk limit, quota exceeded (writes denied)
# The same in the older ``error_code`` enum: NoReplicaAvailable, RateLimit, NotReadyServe; then
# ForceDeny, InsufficientMemoryToLoad, MemoryQuotaExhausted, DiskQuotaExhausted.
_RETRY_LEGACY = {46, 49, 56}
_FULL_LEGACY = {48, 52, 53, 54}
_TOO_LARGE = "larger than max"  # gRPC's refusal of a message over its size limit

_lite_lock = threading.Lock()
_lite_users: dict[str, int] = {}  # Milvus Lite data dir (os.path.abspath) -> its users in this process


def connect(path: Path, config: MilvusConfig, where: str) -> tuple[Any, str | None]:
    """A dedicated client for ``config`` and, when embedded, the Lite data dir it holds (release it
    with :func:`release_lite`). :class:`RetryableError` when Milvus cannot be reached (embedded:
    the data dir is held by another process, or damaged); :class:`ConfigError` for a malformed
    uri or a server that refuses the connection (credentials, database)."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException, MilvusException

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # it logs every failed call itself
    data_dir = None
    if config.uri is None:
        path.mkdir(parents=True, exist_ok=True)
        data_dir = os.path.abspath(path / DB_NAME)  # as Milvus Lite's server manager keys it
        with _lite_lock:
            _lite_users[data_dir] = _lite_users.get(data_dir, 0) + 1
    try:
        if data_dir is not None:
            return MilvusClient(data_dir, timeout=config.timeout_s, dedicated=True), data_dir
        token = config.token.get_secret_value() if config.token is not None else ""
        client = MilvusClient(
            uri=config.uri, token=token, db_name=config.db_name, timeout=config.timeout_s, dedicated=True
        )
        return client, None
    except BaseException as exc:
        if data_dir is not None:
            release_lite(data_dir)
        if isinstance(exc, ConnectionConfigException) and data_dir is not None:  # Lite did not start
            raise RetryableError(
                f"{where}: Milvus Lite cannot open {data_dir}: another process holds it (one process "
                f"per data dir) or it is damaged (the milvus_lite log says which): {exc}"
            ) from exc
        if isinstance(exc, ConnectionConfigException):
            raise ConfigError(f"{where}: index.milvus.uri: {exc}") from exc
        error = error_class(exc) if isinstance(exc, Exception) else None
        if error is not None and issubclass(error, RetryableError):
            raise error(f"{where}: cannot connect: {exc}") from exc
        if isinstance(exc, MilvusException):
            raise ConfigError(
                f"{where}: the server refuses the connection (index.milvus.uri, token, db_name): {exc}"
            ) from exc
        exc.add_note(f"{where}: connecting")
        raise


def release_lite(data_dir: str) -> bool:
    """Forgets one user of ``data_dir``; the last one stops its Milvus Lite server, which flushes
    what its log holds into segments and unlocks the data dir. True when this stopped it."""
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        users = _lite_users.get(data_dir, 0) - 1
        if users > 0:
            _lite_users[data_dir] = users
            return False
        _lite_users.pop(data_dir, None)
        server_manager_instance.release_server(data_dir)
        return True


def is_milvus_lite(client: Any, timeout: float) -> bool:
    """Whether ``client`` talks to Milvus Lite (embedded, or its ``milvus-lite server``)."""
    return str(client.get_server_version(timeout=timeout)).startswith("milvus_lite")


def error_class(exc: BaseException) -> type[RiverbedError] | None:
    """The Riverbed error a failed call to Milvus raises (see the module doc), None when no
    exception of ``exc``'s chain of causes says. A cause that says more wins over a wrapper that
    says less (pymilvus wraps the last failure of its own retries in a "Retry timeout" error):
    :class:`ProcessingError` over :class:`StorageFullError` over :class:`RetryableError`."""
    found = {_verdict(seen) for seen in _causes(exc)}
    return next(
        (error for error in (ProcessingError, StorageFullError, RetryableError) if error in found), None
    )


def _verdict(exc: BaseException) -> type[RiverbedError] | None:
    import grpc
    from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException

    if isinstance(exc, grpc.RpcError):
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in str(exc.details()):
            return ProcessingError
        return RetryableError if exc.code().name in _RETRY_GRPC else None
    if isinstance(exc, ConnectError | MilvusUnavailableException | TimeoutError | ConnectionError):
        return RetryableError
    if not isinstance(exc, MilvusException):
        return None
    code, legacy, message = exc.code, exc.compatible_code, str(exc.message)
    if _TOO_LARGE in message or exc.is_input_error:
        return ProcessingError
    if code in _FULL_CODES or legacy in _FULL_LEGACY:
        return StorageFullError
    timed_out = "Retry timeout" in message or "Retry run out" in message  # pymilvus's own retries
    if exc.retriable or code in _RETRY_CODES or legacy in _RETRY_LEGACY or timed_out:
        return RetryableError
    return None


def milvus_code(exc: BaseException) -> int | None:
    """The first Milvus status code in ``exc``'s chain of causes."""
    from pymilvus.exceptions import MilvusException

    for seen in _causes(exc):
        if isinstance(seen, MilvusException) and isinstance(seen.code, int):
            return seen.code
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:  # pymilvus raises some errors "from" themselves
        seen.append(current)
        yield current
        current = current.__cause__


class LiteFiles:
    """Makes what Milvus Lite wrote for some collections durable: :meth:`sync` fsyncs each file
    and directory under their directories whose size or modification time changed since it last
    did (a few files: the collection's log, manifest and segments).

    Milvus Lite 3.2 hands its log (WAL) to the OS after each write without fsyncing it (it does
    only when a flush retires it), and writes segments (Parquet) without fsync before its
    manifest points to them; neither is configurable. fsync acts on a file whatever descriptor
    wrote it, so syncing the files after a write makes it survive an OS crash or power loss. This
    relies on Lite's layout, ``<data dir>/collections/<name>/``, which :meth:`check` verifies.
    """

    def __init__(self, data_dir: str) -> None:
        self._root = Path(data_dir) / "collections"
        self._synced: dict[str, dict[str, tuple[int, int]]] = {}

    def check(self, collections: Iterable[str], where: str) -> None:
        """:class:`ConfigError` when a collection has no directory where Lite 3.2 keeps it."""
        for name in collections:
            if not (self._root / name).is_dir():
                raise ConfigError(
                    f"{where}: Milvus Lite keeps no directory {self._root / name}: this milvus-lite lays "
                    "out its files unlike 3.2, so its writes cannot be made durable (install the "
                    "milvus-lite the lock file names)"
                )

    def sync(self, collections: Iterable[str]) -> None:
        """fsyncs what changed under these collections' directories, and the directory holding them."""
        _fsync(str(self._root))
        for name in collections:
            before, now = self._synced.get(name, {}), {}
            for directory, _, files in os.walk(self._root / name):
                for path in (directory, *(os.path.join(directory, f) for f in files)):
                    try:
                        status = os.stat(path)
                    except FileNotFoundError:  # retired by Lite meanwhile: its data is elsewhere
                        continue
                    stamp = (status.st_size, status.st_mtime_ns)  # taken first: a later change syncs again
                    if before.get(path) == stamp or _fsync(path):
                        now[path] = stamp
            self._synced[name] = now


def _fsync(path: str) -> bool:
    """fsyncs the file or directory ``path``; False when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True
