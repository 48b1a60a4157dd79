"""Retrieval metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from cluster.eval.metrics import (
    best_over,
    contains_answer,
    documents_in_order,
    exact_match,
    mrr_at,
    ndcg_at,
    normalize_answer,
    precision_recall,
    recall_at,
    rouge_l,
    score_run,
    token_f1,
)


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


# ANSWERS
def test_squad_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a word


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # pred {denver broncos won} vs ref {denver broncos}: P 2/3, R 1 -> F1 0.8
    assert token_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    assert token_f1("x", "y") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 1.0  # "a" normalises to "", as in SQuAD
    assert token_f1("x", "") == 0.0
    assert token_f1("", "Denver") == 0.0
    # repeated tokens count once per occurrence on both sides
    assert token_f1("to to be", "to be") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_rouge_l_uses_the_longest_common_subsequence():
    # pred: denver beat carolina in final; ref: denver carolina final -> LCS 3
    p, r = 3 / 5, 3 / 3
    assert rouge_l("Denver beat Carolina in the final", "Denver Carolina final") == pytest.approx(
        2 * p * r / (p + r)
    )
    assert rouge_l("y x", "x y") == pytest.approx(0.5)  # order matters, unlike F1
    assert token_f1("y x", "x y") == 1.0
    assert rouge_l("", "x y") == 0.0


def test_best_over_takes_the_closest_reference():
    refs = ["Santa Clara, California", "Levi's Stadium"]
    assert best_over(exact_match, "Levi's Stadium", refs) == 1.0
    assert best_over(token_f1, "at Levi's Stadium", refs) == pytest.approx(0.8)
    assert best_over(token_f1, "anything", []) == 0.0


def test_contains_answer_matches_whole_normalised_words():
    assert contains_answer("It was the Denver Broncos, in 2016.", ["Denver Broncos"])
    assert not contains_answer("Denverites", ["Denver"])
    assert not contains_answer("anything", ["", "the"])  # empty after normalising: never a match


def test_precision_recall_counts_and_undefined_ratios():
    out = precision_recall([True, True, False, False], [True, False, True, False])
    assert out == {"precision": 0.5, "recall": 0.5, "true_positives": 1, "predicted": 2, "actual": 2}
    none = precision_recall([False, False], [False, False])
    assert math.isnan(none["precision"]) and math.isnan(none["recall"])
