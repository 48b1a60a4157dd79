"""`riverbed eval retrieval` end to end on a small BEIR dataset cut from the sample corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cluster.eval.retrieval import eval_retrieval
from tests.integration.conftest import REPO


def small_dataset(
    target: Path, n_docs: int = 60, source: str = "squad-v1.1-dev", qrels_file: str = "qrels.tsv"
) -> int:
    """The first ``n_docs`` passages of ``data/<source>`` with their questions and ``qrels_file``
    cut to them; returns how many questions."""
    data = REPO / "data" / source
    target.mkdir(parents=True)
    lines = (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n_docs]
    (target / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = {json.loads(line)["id"] for line in lines}
    with (data / qrels_file).open(encoding="utf-8") as f:
        qrels = [r for r in csv.DictReader(f, delimiter="\t") if r["corpus-id"] in docs]
    with (target / qrels_file).open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n" for r in qrels)
    wanted = {r["query-id"] for r in qrels}
    queries = [q for q in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()
               if json.loads(q)["id"] in wanted]  # fmt: skip
    (target / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    return len(wanted)


def test_eval_retrieval_ingests_the_corpus_and_scores_every_mode(settings, ray_session, tmp_path):
    n_queries = small_dataset(tmp_path / "mini.v1")  # a name that is no valid index name
    report = eval_retrieval(
        settings, tmp_path / "mini.v1", split="all", sample=80, seed=1, out_dir=tmp_path / "out"
    )
    assert report["queries"] == min(80, n_queries)
    for mode in ("vector", "keyword", "hybrid"):
        scores = report["modes"][mode]
        assert (
            0 <= scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= scores["recall@20"] <= 1
        )
        # 60 passages: the gold one is nearly always in the top 20, whatever the mode
        assert scores["recall@20"] > 0.9, (mode, scores)
    assert report["modes"]["hybrid"]["mrr@10"] > 0.6
    assert (tmp_path / "out" / "retrieval-mini.v1-all.json").is_file()
    # held-out and tune splits partition the queries
    again = {"modes": ("keyword",), "index": report["index"], "out_dir": tmp_path / "out"}
    tune = eval_retrieval(settings, tmp_path / "mini.v1", split="tune", **again)
    held = eval_retrieval(settings, tmp_path / "mini.v1", split="heldout", **again)
    assert tune["queries"] + held["queries"] == n_queries
