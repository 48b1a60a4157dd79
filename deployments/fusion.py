"""Merging per-shard results and fusing vector with keyword results (pure functions, no Ray).

- :func:`merge_shards`: each shard returns its own top k; the global top k is among them.
  Vector scores (inner products) compare across shards exactly; BM25 scores use each shard's
  statistics, which stable-hash routing keeps alike, so they compare closely.
- :func:`fuse`: reciprocal rank fusion, ``score = Σ weight_m / (rrf_k + rank_m)`` over the modes
  that found the chunk (Cormack et al., 2009). Ranks, unlike raw scores, are comparable between
  cosine similarity and BM25, which is why RRF needs no score calibration.
- Modalities (passages and images, each list from its own index; a hit is known by its modality
  and chunk id, since an image ``x`` and a document ``x`` both have a chunk ``x#0``):
  :func:`merge_by_score` when the scores share one scale (cosines of one query vector in one
  space), :func:`fuse_in_one_space` for hybrid lists in one space, and :func:`fuse_ranks`
  (RRF over the lists' own ranks) when they do not.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace

from actors.alignment import chunk_alignment
from actors.vector_index import Hit
from schemas.api import Modality


@dataclass(frozen=True)
class Ranked:
    """A hit with where each retriever placed it (1-based ranks; None: not found by that one)."""

    hit: Hit
    score: float
    vector_rank: int | None = None
    vector_score: float | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    fused_score: float | None = None
    modality: Modality = "text"
    """The index the hit comes from: passages (text) or the images index (image)."""
    graph_rank: int | None = None
    """Its rank in the knowledge graph's ranking (``mode: graph``; None: the graph did not bring it)."""
    graph_entities: tuple[str, ...] = ()
    """The entities that brought it in through the graph, the strongest first."""
    rerank_score: float | None = None
    """The cross-encoder's score for it (``serve.search.rerank``; None: not reranked)."""

    @property
    def key(self) -> tuple[Modality, str]:
        """The hit's identity across modalities."""
        return (self.modality, self.hit.chunk_id)


def merge_shards(per_shard: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` hits over every shard's list, by score (ties: chunk id), each chunk once."""
    best: dict[str, Hit] = {}
    for hits in per_shard:
        for hit in hits:
            seen = best.get(hit.chunk_id)
            if seen is None or hit.score > seen.score:
                best[hit.chunk_id] = hit
    return sorted(best.values(), key=lambda h: (-h.score, h.chunk_id))[:k]


def ranked_vector(hits: Sequence[Hit]) -> list[Ranked]:
    return [Ranked(h, h.score, vector_rank=i, vector_score=h.score) for i, h in enumerate(hits, 1)]


def ranked_keyword(hits: Sequence[Hit]) -> list[Ranked]:
    return [Ranked(h, h.score, keyword_rank=i, keyword_score=h.score) for i, h in enumerate(hits, 1)]


def fuse(
    vector: Sequence[Hit],
    keyword: Sequence[Hit],
    k: int,
    rrf_k: float = 60.0,
    vector_weight: float = 1.0,
    keyword_weight: float = 1.0,
) -> list[Ranked]:
    """Reciprocal rank fusion of two best-first lists; the top ``k``, best first (ties: the
    better vector rank, then chunk id). Each result keeps both ranks and scores."""
    hits: dict[str, Hit] = {}
    v_ranks: dict[str, int] = {}
    k_ranks: dict[str, int] = {}
    for rank, hit in enumerate(vector, 1):
        hits.setdefault(hit.chunk_id, hit)
        v_ranks.setdefault(hit.chunk_id, rank)
    for rank, hit in enumerate(keyword, 1):
        hits.setdefault(hit.chunk_id, hit)
        k_ranks.setdefault(hit.chunk_id, rank)
    v_scores = {h.chunk_id: h.score for h in reversed(vector)}
    k_scores = {h.chunk_id: h.score for h in reversed(keyword)}
    fused: list[Ranked] = []
    for cid, hit in hits.items():
        v_rank, k_rank = v_ranks.get(cid), k_ranks.get(cid)
        score = (vector_weight / (rrf_k + v_rank) if v_rank is not None else 0.0) + (
            keyword_weight / (rrf_k + k_rank) if k_rank is not None else 0.0
        )
        fused.append(
            Ranked(hit, score, v_rank, v_scores.get(cid), k_rank, k_scores.get(cid), fused_score=score)
        )
    never = float("inf")
    fused.sort(key=lambda r: (-r.score, r.vector_rank or never, r.hit.chunk_id))
    return fused[:k]


def merge_by_score(lists: Sequence[Sequence[Ranked]], k: int) -> list[Ranked]:
    """The best ``k`` of several best-first lists by ``score`` (ties: list order, then rank). Only
    for scores on one scale: vector scores of the same query vector in one space."""
    merged = [(r, i, rank) for i, ranked in enumerate(lists) for rank, r in enumerate(ranked)]
    merged.sort(key=lambda t: (-t[0].score, t[1], t[2]))
    return [r for r, _, _ in merged[:k]]


def fuse_ranks(lists: Sequence[Sequence[Ranked]], k: int, rrf_k: float = 60.0) -> list[Ranked]:
    """Reciprocal rank fusion of best-first lists whose scores do not compare (two indexes'
    BM25, two models' cosines): ``score = Σ 1 / (rrf_k + rank)`` over the lists holding the hit
    (by :attr:`Ranked.key`). Each result keeps its own list's ranks and scores; ``score`` and
    ``fused_score`` are the fused one. The top ``k``, best first (ties: list order, then rank)."""
    scores: dict[tuple[Modality, str], float] = {}
    first: dict[tuple[Modality, str], tuple[Ranked, int, int]] = {}
    for i, ranked in enumerate(lists):
        for rank, r in enumerate(ranked, 1):
            scores[r.key] = scores.get(r.key, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(r.key, (r, i, rank))
    order = sorted(first, key=lambda key: (-scores[key], first[key][1], first[key][2]))
    return [replace(first[key][0], score=scores[key], fused_score=scores[key]) for key in order[:k]]


def fuse_in_one_space(
    lists: Sequence[Sequence[Ranked]],
    k: int,
    rrf_k: float = 60.0,
    vector_weight: float = 1.0,
    keyword_weight: float = 1.0,
) -> list[Ranked]:
    """Hybrid results of several indexes searched with ONE query vector in one space, fused again
    as one list: vector ranks taken over all of them (their vector scores compare), keyword ranks
    each within its own list (BM25 of two indexes does not); ``score = vector_weight / (rrf_k +
    vector rank) + keyword_weight / (rrf_k + keyword rank)``, as :func:`fuse`. The top ``k``, best
    first (ties: the better vector rank, then list order)."""
    hits = [(r, i) for i, ranked in enumerate(lists) for r in ranked]
    by_vector = sorted(
        (n for n, (r, _) in enumerate(hits) if r.vector_score is not None),
        key=lambda n: (-(hits[n][0].vector_score or 0.0), hits[n][1]),
    )
    vector_rank = {n: rank for rank, n in enumerate(by_vector, 1)}
    fused: list[tuple[Ranked, int]] = []
    for n, (r, i) in enumerate(hits):
        v_rank = vector_rank.get(n)
        score = (vector_weight / (rrf_k + v_rank) if v_rank is not None else 0.0) + (
            keyword_weight / (rrf_k + r.keyword_rank) if r.keyword_rank is not None else 0.0
        )
        fused.append((replace(r, score=score, vector_rank=v_rank, fused_score=score), i))
    never = float("inf")
    fused.sort(key=lambda t: (-t[0].score, t[0].vector_rank or never, t[1]))
    return [r for r, _ in fused[:k]]


_WORD = re.compile(r"\w+", re.UNICODE)
_SUFFIXES = ("ing", "edly", "ed", "es", "s", "ly")


def _fold(word: str) -> str:
    """Lowercase, accents removed, a few English suffixes stripped: close to what FTS5's
    ``porter unicode61 remove_diacritics 2`` tokenizer matches, for highlighting only."""
    decomposed = unicodedata.normalize("NFKD", word.lower())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    for suffix in _SUFFIXES:
        if len(plain) > len(suffix) + 2 and plain.endswith(suffix):
            return plain[: -len(suffix)]
    return plain


def matched_terms(query: str, hit: Hit) -> list[dict[str, object]]:
    """The query's words found in the chunk's text, in text order: ``{"term", "start", "end",
    "text_start", "text_end"}``.

    ``start``/``end`` are code points of the DOCUMENT's text as its producer sent it, mapped
    through the chunk's alignment, so ``document[start:end]`` is the word as written (cleaning
    that slice gives ``term``; see :mod:`actors.chunker` for the one exception, an edge inside
    a cluster NFC rewrote). Both are None when the chunk's alignment is not known (stored before
    alignments, and not plain ASCII as long as its span). ``text_start``/``text_end`` are
    offsets in the hit's ``text``.
    """
    wanted = {_fold(w) for w in _WORD.findall(query)}
    align = chunk_alignment(hit.alignment, hit.text, hit.span)
    found: list[dict[str, object]] = []
    for match in _WORD.finditer(hit.text):
        if _fold(match.group()) in wanted:
            a, b = match.span()
            start, end = (align.start(a), align.end(b)) if align is not None else (None, None)
            found.append({"term": match.group(), "start": start, "end": end, "text_start": a, "text_end": b})
    return found
