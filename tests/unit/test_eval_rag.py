"""`eval rag`'s aggregation over per-question records, by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.eval.rag import load_questions, summarise
from schemas.errors import ConfigError


def record(impossible: bool, abstained: bool, em: float = 0.0, f1: float = 0.0, **kw: object) -> dict:
    base = {
        "impossible": impossible,
        "abstained": abstained,
        "reason": "weak_retrieval" if abstained else None,
        "em": em,
        "f1": f1,
        "rouge_l": f1,
        "contains": em,
        "citations": [],
        "citation_correct": False,
        "gold_in_context": True,
        "nll": None,
        "tokens": 0,
    }
    return {**base, **kw}


def test_summary_by_hand():
    records = [
        record(False, False, 1.0, 1.0, citations=["d#0"], citation_correct=True, nll=2.0, tokens=2),
        record(False, False, 0.0, 0.5, citations=["d#1"], citation_correct=False, nll=4.0, tokens=2),
        record(False, True, gold_in_context=False, nll=6.0, tokens=4),
        record(True, True),
        record(True, False, citations=["e#0"]),
    ]
    s = summarise(records)
    assert (s["questions"], s["answerable"], s["unanswerable"]) == (5, 3, 2)
    assert s["exact_match"] == pytest.approx(1 / 3)  # the abstention on an answerable one scores 0
    assert s["f1"] == pytest.approx(0.5)
    assert s["exact_match_answered"] == pytest.approx(0.5) and s["answered_rate"] == pytest.approx(2 / 3)
    assert s["context_recall"] == pytest.approx(2 / 3)
    assert s["cited_rate"] == 1.0 and s["citation_accuracy"] == 0.5  # over answered answerable ones
    assert s["abstention"]["precision"] == 0.5 and s["abstention"]["recall"] == 0.5
    assert s["abstained_by_reason"] == {"weak_retrieval": 2}
    assert s["perplexity"] == pytest.approx(math.exp(12.0 / 8)) and s["perplexity_tokens"] == 8
    # SQuAD v2: answerable ones by EM, unanswerable ones right when abstained
    assert s["v2_exact_match"] == pytest.approx((1 + 0 + 0 + 1 + 0) / 5)
    assert s["v2_f1"] == pytest.approx((1 + 0.5 + 0 + 1 + 0) / 5)


def test_nothing_measured_is_nan_not_zero():
    s = summarise([record(True, False)])
    assert math.isnan(s["exact_match"]) and math.isnan(s["perplexity"]) and math.isnan(s["cited_rate"])
    assert s["abstention"]["recall"] == 0.0 and math.isnan(s["abstention"]["precision"])


def test_questions_without_answers_are_refused_with_the_line(tmp_path: Path):
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"id": "q1", "text": "?", "answers": ["x"]}) + "\n" + json.dumps({"id": "q2", "text": "?"})
    )
    with pytest.raises(ConfigError, match="line 2: no 'answers' list"):
        load_questions(tmp_path)


def test_report_names_tell_datasets_and_corpora_apart(tmp_path: Path):
    from cluster.eval.retrieval import report_name

    de, en = tmp_path / "xquad" / "de", tmp_path / "xquad" / "en"
    assert report_name("retrieval", de, None, "heldout") == "retrieval-xquad-de-heldout"
    assert report_name("retrieval", de, en, "heldout") == "retrieval-xquad-de-on-xquad-en-heldout"
    assert report_name("rag", tmp_path / "squad-v2.0-dev", tmp_path / "squad-v2.0-dev", "all") == (
        "rag-squad-v2.0-dev-all"
    )
