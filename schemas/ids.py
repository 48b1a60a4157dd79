"""Deterministic ids and routing, identical in every process: a chunk's id is
``<document id>#<n>``, and its shard is ``stable_hash(chunk id) % shards``.

Never use Python's ``hash()`` for anything that crosses a process: it is salted per process.
"""

from __future__ import annotations

from hashlib import blake2b

CHUNK_SEPARATOR = "#"


def stable_hash(s: str) -> int:
    """A 64-bit hash of ``s`` that is the same in every process, machine and Python version."""
    return int.from_bytes(blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")


def chunk_id(document_id: str, chunk_number: int) -> str:
    """The id of chunk ``chunk_number`` (0-based) of ``document_id``: ``"<document_id>#<n>"``.

    Deterministic, so a re-delivered record upserts the same ids and changes nothing.
    """
    if chunk_number < 0:
        raise ValueError(f"chunk_number must be >= 0, got {chunk_number}")
    return f"{document_id}{CHUNK_SEPARATOR}{chunk_number}"


def split_chunk_id(cid: str) -> tuple[str, int]:
    """Inverse of :func:`chunk_id`. Document ids may themselves contain ``#``."""
    document_id, sep, number = cid.rpartition(CHUNK_SEPARATOR)
    if not sep or not number.isdigit():
        raise ValueError(f"not a chunk id: {cid!r}")
    return document_id, int(number)


def shard_of(chunk_id_: str, n_shards: int) -> int:
    """``stable_hash(chunk_id) % n_shards``: the one routing function used everywhere."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return stable_hash(chunk_id_) % n_shards


def in_tune_split(query_id: str) -> bool:
    """Evaluation split: questions whose stable hash is even are for tuning, odd are held out."""
    return stable_hash(query_id) % 2 == 0
