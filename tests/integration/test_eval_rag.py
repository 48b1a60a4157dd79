"""`riverbed eval rag` end to end on a SQuAD v2.0 cut: real pipeline, real MiniLM, real SmolLM2."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from cluster.eval.rag import eval_rag
from tests.integration.conftest import REPO


def small_v2(target: Path, n_docs: int = 40) -> tuple[int, int]:
    """The first ``n_docs`` passages of SQuAD v2.0 dev with their questions, answerable and not;
    returns (answerable, unanswerable) question counts."""
    source = REPO / "data" / "squad-v2.0-dev"
    target.mkdir(parents=True)
    lines = (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n_docs]
    (target / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = {json.loads(line)["id"] for line in lines}
    with (source / "qrels_all.tsv").open(encoding="utf-8") as f:
        qrels = [r for r in csv.DictReader(f, delimiter="\t") if r["corpus-id"] in docs]
    with (target / "qrels_all.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in qrels)
    wanted = {r["query-id"] for r in qrels}
    rows = [json.loads(q) for q in (source / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["id"] in wanted]
    (target / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    impossible = sum(r["is_impossible"] for r in rows)
    return len(rows) - impossible, impossible


def test_eval_rag_scores_answers_citations_abstention_and_perplexity(settings, ray_session, tmp_path):
    answerable, unanswerable = small_v2(tmp_path / "v2cut")
    assert answerable > 0 and unanswerable > 0
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
