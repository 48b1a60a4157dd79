"""Merging shard results and reciprocal rank fusion."""

from __future__ import annotations

import pytest

from actors.vector_index import Hit
from deployments.fusion import fuse, matched_terms, merge_shards


def hit(cid: str, score: float, text: str = "t", start: int = 0) -> Hit:
    return Hit(cid, cid.split("#")[0], 0, text, None, start, start + len(text), {}, score)


def test_merge_shards_takes_the_global_top_k_once_each():
    a = [hit("a#0", 0.9), hit("c#0", 0.5)]
    b = [hit("b#0", 0.7), hit("a#0", 0.8), hit("d#0", 0.1)]
    merged = merge_shards([a, b], 3)
    assert [h.chunk_id for h in merged] == ["a#0", "b#0", "c#0"]
    assert merged[0].score == 0.9


def test_merge_shards_breaks_ties_by_chunk_id():
    assert [h.chunk_id for h in merge_shards([[hit("z#0", 1.0)], [hit("b#0", 1.0)]], 2)] == ["b#0", "z#0"]


def test_rrf_rewards_agreement_and_keeps_both_ranks():
    vector = [hit("a#0", 0.9), hit("b#0", 0.8), hit("c#0", 0.7)]
    keyword = [hit("c#0", 12.0), hit("b#0", 10.0), hit("d#0", 9.0)]
    fused = fuse(vector, keyword, k=4, rrf_k=60)
    # c: 1/63 + 1/61 = 0.032266 beats b: 2/62 = 0.032258; both beat a (1/61) and d (1/63)
    assert [r.hit.chunk_id for r in fused] == ["c#0", "b#0", "a#0", "d#0"]
    b = fused[1]
    assert (b.vector_rank, b.keyword_rank) == (2, 2)
    assert b.score == pytest.approx(2 / 62)
    assert (b.vector_score, b.keyword_score) == (0.8, 10.0)
    assert fused[3].vector_rank is None and fused[3].keyword_rank == 3


def test_rrf_weights_shift_the_order():
    vector = [hit("a#0", 0.9), hit("b#0", 0.1)]
    keyword = [hit("b#0", 5.0), hit("a#0", 1.0)]
    assert fuse(vector, keyword, 2, vector_weight=2.0)[0].hit.chunk_id == "a#0"
    assert fuse(vector, keyword, 2, keyword_weight=2.0)[0].hit.chunk_id == "b#0"
    # equal weights tie on score: the better vector rank wins
    assert fuse(vector, keyword, 2)[0].hit.chunk_id == "a#0"


def test_rrf_with_one_empty_side_keeps_the_other_order():
    vector = [hit("a#0", 0.9), hit("b#0", 0.8)]
    assert [r.hit.chunk_id for r in fuse(vector, [], 5)] == ["a#0", "b#0"]


def test_matched_terms_are_in_document_coordinates():
    h = hit("a#1", 1.0, text="Cats were sleeping; the cat sleeps.", start=100)
    found = matched_terms("sleeping cats", h)
    assert [f["term"] for f in found] == ["Cats", "sleeping", "cat", "sleeps"]
    first = found[0]
    assert (first["start"], first["end"]) == (100, 104)
