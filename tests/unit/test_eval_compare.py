"""`riverbed eval compare`: methods labelled from their reports, only runs over the same questions
compared, the table and the chart written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.eval.compare import compare_retrieval
from schemas.errors import ConfigError

SCORES = {"recall@1": 0.6, "recall@5": 0.8, "recall@10": 0.9, "mrr@10": 0.7, "ndcg@10": 0.75}


def _report(tmp_path: Path, name: str, **fields: object) -> Path:
    report = {
        "dataset": "data/squad-v1.1-dev",
        "corpus": "data/squad-v1.1-dev/corpus.jsonl",
        "split": "heldout",
        "sample": 1000,
        "seed": 0,
        "queries": 1000,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "rerank": None,
        "modes": {"vector": dict(SCORES), "keyword": dict(SCORES), "hybrid": {**SCORES, "mrr@10": 0.85}},
        **fields,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_methods_are_labelled_by_mode_reranking_and_model(tmp_path):
    base = _report(tmp_path, "base")
    reranked = _report(
        tmp_path,
        "rerank",
        rerank={"model": "riverbed/reranker-squad"},
        modes={"hybrid": {**SCORES, "mrr@10": 0.87}},
    )
    tuned = _report(
        tmp_path,
        "tuned",
        model="/cache/models/embedder-squad-f0b0",
        modes={"vector": {**SCORES, "recall@10": 0.957}, "keyword": dict(SCORES)},
    )
    result = compare_retrieval([base, reranked, tuned], tmp_path / "out")
    assert list(result["methods"]) == [
        "vector",
        "keyword",
        "hybrid",
        "hybrid + rerank",
        "vector (embedder-squad-f0b0)",
    ]
    assert result["methods"]["hybrid + rerank"]["mrr@10"] == 0.87
    assert result["methods"]["vector (embedder-squad-f0b0)"]["recall@10"] == 0.957
    # keyword search embeds nothing: another model's keyword row, scoring the same, is shown once
    md = Path(result["markdown"]).read_text()
    assert Path(result["markdown"]).name == "retrieval-compare-squad-v1.1-dev-heldout.md"
    assert "| hybrid + rerank | 0.600 | 0.800 | 0.900 | 0.870 | 0.750 |" in md
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_named_as_variants_of_one_name_are_labelled_by_what_their_names_add(tmp_path):
    from cluster.eval.compare import variants

    base = _report(tmp_path, "retrieval-squad-heldout")
    reranked = _report(
        tmp_path,
        "retrieval-squad-heldout-rerank",
        rerank={"model": "a"},
        modes={"hybrid": {**SCORES, "mrr@10": 0.9}},
    )
    older = _report(
        tmp_path, "retrieval-squad-heldout-rerank-from-minilm", rerank={"model": "b"},
        modes={"hybrid": {**SCORES, "mrr@10": 0.87}},
    )  # fmt: skip
    lora = _report(
        tmp_path, "retrieval-squad-heldout-embedder-lora", model="/cache/models/embedder-squad-763ce0eb",
        modes={"vector": {**SCORES, "recall@10": 0.955}},
    )  # fmt: skip
    result = compare_retrieval([base, reranked, older, lora], tmp_path / "out")
    assert list(result["methods"]) == [
        "vector", "keyword", "hybrid", "hybrid + rerank", "hybrid + rerank [rerank-from-minilm]",
        "vector (embedder-lora)",
    ]  # fmt: skip
    assert result["methods"]["hybrid + rerank [rerank-from-minilm]"]["mrr@10"] == 0.87
    assert result["methods"]["vector (embedder-lora)"]["recall@10"] == 0.955
    # names sharing no word, and a single report, have no variant: the model or file name is used
    assert variants([Path("a-b.json"), Path("c-b.json")]) == ["", ""]
    assert variants([Path("x-y.json")]) == [""]
    assert variants([Path("x-y.json"), Path("x-y-z.json"), Path("x.json")]) == ["y", "y-z", ""]


@pytest.mark.parametrize(
    ("field", "value"),
    [("split", "tune"), ("queries", 999), ("dataset", "data/squad-v2.0-dev"), ("seed", 1), ("sample", 500)],
)
def test_runs_over_other_questions_are_refused_naming_the_field(tmp_path, field, value):
    base = _report(tmp_path, "base")
    other = _report(tmp_path, "other", **{field: value})
    with pytest.raises(ConfigError, match=f"{field} .* differs"):
        compare_retrieval([base, other], tmp_path / "out")


def test_an_older_report_without_sample_and_seed_still_compares(tmp_path):
    older = tmp_path / "older.json"
    report = json.loads(_report(tmp_path, "x").read_text())
    del report["sample"], report["seed"]
    older.write_text(json.dumps(report))
    assert compare_retrieval([_report(tmp_path, "base"), older], tmp_path / "out")["methods"]


def test_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such report"):
        compare_retrieval([tmp_path / "absent.json"], tmp_path)
    (tmp_path / "rag.json").write_text(json.dumps({"questions": 200}))
    with pytest.raises(ConfigError, match="not a retrieval report"):
        compare_retrieval([tmp_path / "rag.json"], tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a JSON report"):
        compare_retrieval([tmp_path / "bad.json"], tmp_path)
    with pytest.raises(ConfigError, match="at least one"):
        compare_retrieval([], tmp_path)


def test_two_rerankers_are_told_apart_and_a_cross_lingual_run_is_named_by_its_corpus(tmp_path):
    base = _report(tmp_path, "base", rerank={"model": "a"})
    other = _report(
        tmp_path, "other-reranker", rerank={"model": "b"}, modes={"hybrid": {**SCORES, "mrr@10": 0.5}}
    )
    result = compare_retrieval([base, other], tmp_path / "out")
    assert result["methods"]["hybrid + rerank [other-reranker]"]["mrr@10"] == 0.5
    assert result["methods"]["hybrid + rerank"]["mrr@10"] == 0.85
    crossed = _report(tmp_path, "de", dataset="data/xquad/de", corpus="data/xquad/en/corpus.jsonl")
    result = compare_retrieval([crossed], tmp_path / "out")
    assert Path(result["plot"]).name == "retrieval-compare-xquad-de-on-xquad-en-heldout.png"
    empty = _report(tmp_path, "empty", modes={})
    with pytest.raises(ConfigError, match="score no mode"):
        compare_retrieval([empty], tmp_path / "out")


def test_the_cli_compares_and_refuses_what_does_not_fit(tmp_path, capsys):
    base = _report(tmp_path, "base")
    other = _report(tmp_path, "other", rerank={"model": "r"})
    # reports before, after and around the options
    for argv in (
        ["eval", "compare", str(base), str(other), "--out", str(tmp_path / "out")],
        ["eval", "compare", "--out", str(tmp_path / "out"), str(base), str(other)],
        ["eval", "compare", str(base), "--out", str(tmp_path / "out"), str(other)],
    ):
        assert main([*argv, "--home", str(tmp_path)]) == 0
        assert "hybrid + rerank" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--dataset", "d", "--bogus", "--home", str(tmp_path)])
    assert main(["eval", "retrieval", "--home", str(tmp_path)]) != 0
    assert "needs --dataset" in capsys.readouterr().err
    assert main(["eval", "retrieval", str(base), "--dataset", "d", "--home", str(tmp_path)]) != 0
    assert "takes no report files" in capsys.readouterr().err
