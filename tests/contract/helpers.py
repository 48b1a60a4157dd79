"""What the contract mixins and the backend-specific tests share: a scratch directory, a corpus of
chunks with metadata and alignments, and the comparison of hit lists."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from actors.vector_index import ChunkRecord, Hit
from schemas.ids import chunk_id

DIM = 32
MODEL = "test/model-a"

# Alignments as the chunker writes them: the identity, pieces, and none (a chunk from an old store).
ALIGNMENTS = ("", "[[0,0],[4,4,6],[5,6]]", None)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A fresh directory, in RAM when the host has /dev/shm: the store fsyncs every write, which
    on a disk makes these tests three times slower. A process crash loses nothing either way."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="riverbed-test-", dir=base) as directory:
        yield Path(directory)


@contextmanager
def milvus_grpc_server() -> Iterator[str]:
    """Milvus Lite served over gRPC in a thread on a free port, as a Milvus server is reached (by
    uri); yields the uri, stops the server after."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    with scratch_dir() as directory:
        server, db, port = start_server_in_thread(str(directory / "server.db"))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop(grace=0)
            db.close()


class StallingRelay:
    """A TCP relay on 127.0.0.1 to ``target_port`` that can stall: while :meth:`stall` holds, every
    byte read on either side waits (none is lost) until it ends, as a server that has stopped
    answering or a network that has stopped delivering looks to a client. ``port`` is where
    clients connect."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @contextmanager
    def stall(self) -> Iterator[None]:
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self._target))
                self._sockets += [client, server]
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):  # either side closed
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_document(rng: np.random.Generator, doc: str, n_chunks: int, text: str = "body") -> list[ChunkRecord]:
    meta: dict[str, str | int | float | bool] = {
        "lang": str(rng.choice(["en", "de", "fr"])),
        "source": str(rng.choice(["a", "b", "c"])),
    }
    if rng.random() < 0.8:  # some documents have no year: the "missing field" case
        meta["year"] = int(rng.integers(1990, 2025))
    vectors = unit(rng, n_chunks)
    return [
        ChunkRecord(
            chunk_id(doc, i),
            doc,
            i,
            f"{text} {doc} {i}",
            f"title {doc}",
            10 * i,
            10 * i + 9,
            meta,
            vectors[i],
            ALIGNMENTS[i % len(ALIGNMENTS)],
        )
        for i in range(n_chunks)
    ]


def make_corpus(seed: int = 0, n_docs: int = 60) -> list[ChunkRecord]:
    rng = np.random.default_rng(seed)
    return [r for d in range(n_docs) for r in make_document(rng, f"doc-{d}", int(rng.integers(2, 9)))]


def ids(hits: list[Hit]) -> list[str]:
    return [h.chunk_id for h in hits]


def assert_same_hits(got: list[list[Hit]], want: list[list[Hit]]) -> None:
    assert [ids(h) for h in got] == [ids(h) for h in want]
    for g, w in zip(got, want, strict=True):
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-5)
        assert g == [Hit(**{**h.__dict__, "score": x.score}) for h, x in zip(w, g, strict=True)]
