"""Retrieval metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from cluster.eval.metrics import documents_in_order, mrr_at, ndcg_at, recall_at, score_run


def test_chunks_collapse_to_their_documents_best_rank():
    assert documents_in_order(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_recall_mrr_ndcg_by_hand():
    ranked = ["x", "gold", "y", "other"]
    rel = {"gold": 1}
    assert recall_at(ranked, rel, 1) == 0.0 and recall_at(ranked, rel, 2) == 1.0
    assert mrr_at(ranked, rel) == 0.5
    assert ndcg_at(ranked, rel) == pytest.approx(1 / math.log2(3))
    assert recall_at(ranked, {"gold": 1, "other": 1}, 2) == 0.5
    assert mrr_at(ranked, {"missing": 1}) == 0.0 and ndcg_at([], {"gold": 1}) == 0.0


def test_graded_ndcg_prefers_the_better_grade_first():
    rel = {"a": 2, "b": 1}
    assert ndcg_at(["a", "b"], rel) == pytest.approx(1.0)
    assert ndcg_at(["b", "a"], rel) < 1.0


def test_score_run_averages_and_counts_missing_queries_as_misses():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    scores = score_run({"q1": ["d1", "z"]}, qrels)
    assert scores["recall@1"] == 0.5 and scores["mrr@10"] == 0.5 and scores["queries"] == 2
