"""`riverbed eval rag` end to end on a SQuAD v2.0 cut: real pipeline, real MiniLM, real SmolLM2."""

from __future__ import annotations

import json
import math

from cluster.eval.rag import eval_rag
from tests.integration.test_eval import small_dataset


def test_eval_rag_scores_answers_citations_abstention_and_perplexity(settings, ray_session, tmp_path):
    small_dataset(tmp_path / "v2cut", 40, "squad-v2.0-dev", "qrels_all.tsv")
    rows = [json.loads(line) for line in (tmp_path / "v2cut" / "queries.jsonl").read_text().splitlines()]
    assert any(r["is_impossible"] for r in rows) and not all(r["is_impossible"] for r in rows)
    # short replies keep the test quick; SQuAD answers are a few words
    settings = settings.model_copy(
        update={"serve": settings.serve.model_copy(
            update={"llm": settings.serve.llm.model_copy(update={"max_new_tokens": 24})})}
    )  # fmt: skip
    report = eval_rag(settings, tmp_path / "v2cut", split="all", sample=6, seed=3, out_dir=tmp_path / "out")
    records = report["records"]
    assert len(records) == report["questions"] == 6
    assert report["answerable"] + report["unanswerable"] == 6 and report["unanswerable"] >= 1
    # 40 passages, 4 in the prompt: retrieval finds the gold passage of nearly every question
    assert report["context_recall"] >= 0.75
    for r in records:
        assert 0 <= r["em"] <= r["f1"] <= 1 and 0 <= r["rouge_l"] <= 1
        assert r["em"] <= r["contains"]  # an exact answer contains itself
        assert r["abstained"] == (r["reason"] is not None)
        assert not (r["abstained"] and r["citations"])
        if not r["impossible"]:
            assert r["tokens"] > 0 and r["nll"] > 0
    abst = report["abstention"]
    assert abst["predicted"] == sum(r["abstained"] for r in records)
    assert abst["actual"] == report["unanswerable"]
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    written = json.loads((tmp_path / "out" / "rag-v2cut-all.json").read_text())
    assert written["exact_match"] == report["exact_match"]
    assert (tmp_path / "out" / "rag-v2cut-all.md").is_file()
