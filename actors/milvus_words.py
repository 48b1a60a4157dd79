"""The words the Milvus backend's keyword search indexes, and how it ranks them.

Both backends match the same words: a chunk's text and title are tokenized here by SQLite's FTS5
tokenizer with the FAISS store's settings (porter stemming, case and accent folding), and Milvus
is given the words joined by spaces, to split on spaces only. Milvus's BM25 uses SQLite FTS5's
constants. Each field (text, title) has its own BM25; :func:`fuse` ranks their weighted sum
exactly from each field's top list.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

__all__ = ["BM25", "FTS5_TOKENIZER", "MAX_QUERY_WORDS", "analyzer", "fuse", "words"]

BM25 = {"bm25_k1": 1.2, "bm25_b": 0.75}  # SQLite FTS5's constants
# The tokenizer of the FAISS store's FTS5 index (actors.store_schema): both backends index the same words.
FTS5_TOKENIZER = "porter unicode61 remove_diacritics 2"
MAX_QUERY_WORDS = 64  # as the FAISS store's keyword search


def analyzer(milvus_lite: bool) -> dict[str, Any]:
    """The Milvus analyzer of the word fields: a server's ``whitespace`` tokenizer keeps each FTS5
    word whole (its ``standard`` one would split a run of CJK ideographs, one FTS5 word, into
    single ideographs). Milvus Lite has no ``whitespace`` tokenizer; its ``standard`` one splits
    on non-word characters, which FTS5 words do not hold."""
    return {"tokenizer": "standard" if milvus_lite else "whitespace"}


def words(texts: list[str], distinct: bool = False) -> list[list[str]]:
    """The words of each text as the FAISS store's FTS5 index finds them, in order (each once when
    ``distinct``): SQLite's own tokenizer, run on an in-memory FTS5 table."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{FTS5_TOKENIZER}')")
        conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        conn.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)", enumerate(texts))
        found: list[list[str]] = [[] for _ in texts]
        for doc, term in conn.execute("SELECT doc, term FROM v ORDER BY doc, offset"):
            found[doc].append(term)
    return [list(dict.fromkeys(w)) for w in found] if distinct else found


def fuse(
    lists: list[list[tuple[str, float]]], weights: list[float], k: int, limit: int
) -> tuple[list[tuple[str, float]], bool]:
    """The top ``k`` by the weighted sum of per-field scores, from each field's best ``limit``
    ``(id, score)``, and whether it is exact: a chunk missing from a full list may score up to
    that list's last score there, so the ranking is exact when every chunk of the top ``k`` is
    known in every list and no other chunk can reach the ``k``-th score. Ties by id."""
    bounds = [scores[-1][1] if len(scores) >= limit else 0.0 for scores in lists]
    known: dict[str, list[float | None]] = {}
    for i, scores in enumerate(lists):
        for cid, score in scores:
            known.setdefault(cid, [None] * len(lists))[i] = score
    low = {c: sum(w * (s or 0.0) for w, s in zip(weights, ss, strict=True)) for c, ss in known.items()}
    high = {
        c: sum(w * (b if s is None else s) for w, s, b in zip(weights, ss, bounds, strict=True))
        for c, ss in known.items()
    }
    top = sorted(known, key=lambda c: (-low[c], c))[:k]
    rest = max(
        [high[c] for c in known.keys() - set(top)]
        + [sum(w * b for w, b in zip(weights, bounds, strict=True))]
    )
    floor = low[top[-1]] if len(top) == k else 0.0
    exact = all(low[c] == high[c] for c in top) and rest <= floor
    return [(c, low[c]) for c in top], exact
