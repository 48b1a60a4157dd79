"""`riverbed eval rag`: answers, citations, abstention and perplexity on a BEIR-layout QA dataset.

# INDEX: as `eval retrieval` (the corpus through the real pipeline into a fresh index, or ``--index``)
# QUESTIONS: ``queries.jsonl`` rows with ``answers`` (and ``is_impossible`` in SQuAD v2.0); the
#   split of ``qrels_all.tsv`` when the dataset has one (it covers unanswerable questions too),
#   else of ``qrels.tsv``; a seeded sample (default 200)
# ANSWER: in this process, the code the app runs: the Searcher over the shard actors (``serve.rag``
#   k and mode), then the RAG deployment's Answerer with the configured generator
# SCORE:
#   - exact match and token F1 with SQuAD's normalisation, and ROUGE-L, each against the closest
#     reference; an abstention scores 0 on an answerable question
#   - answer contains: share of answerable questions whose answer holds a reference answer as
#     whole words (the accuracy generative QA reports: a chat model answers in sentences, SQuAD's
#     references are short spans)
#   - citation accuracy: share of answered questions whose cited passages hold a reference answer
#   - abstention precision and recall against ``is_impossible``
#   - perplexity of the first reference answer as the model's reply to the same prompt (the
#     retrieved passages and the question), token-weighted over the answerable questions
#   - context recall: share of answerable questions whose gold passage was in the prompt, which
#     separates retrieval misses from generation misses
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from actors.embedder import Embedder
from actors.generator import LocalGenerator
from cluster.bench.report import machine, write_report
from cluster.eval.metrics import (
    best_over,
    contains_answer,
    exact_match,
    precision_recall,
    rouge_l,
    token_f1,
)
from cluster.eval.retrieval import (
    _say,
    eval_reranker,
    eval_settings,
    load_qrels,
    open_index,
    report_name,
    select,
)
from cluster.pipeline import release_shards
from deployments.generator import ABSTAIN_POOL, Answerer
from deployments.rag import build_messages
from deployments.retriever import RayShards
from deployments.searcher import Searcher
from schemas.errors import ConfigError
from schemas.settings import Settings


def load_questions(dataset: Path) -> dict[str, dict[str, Any]]:
    """``queries.jsonl`` rows by id; each needs ``text`` and an ``answers`` list (empty for an
    unanswerable question, which ``is_impossible`` marks)."""
    rows: dict[str, dict[str, Any]] = {}
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("answers"), list):
                raise ConfigError(
                    f"{dataset / 'queries.jsonl'} line {n}: no 'answers' list; eval rag needs reference "
                    "answers (SQuAD-style rows: id, text, answers, is_impossible)"
                )
            rows[str(row.get("_id", row.get("id")))] = row
    return rows


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The aggregate scores of per-question records (see :func:`eval_rag`)."""
    answerable = [r for r in records if not r["impossible"]]
    answered = [r for r in answerable if not r["abstained"]]
    cited = [r for r in answered if r["citations"]]
    scored = [r for r in answerable if r["nll"] is not None]
    tokens = sum(r["tokens"] for r in scored)

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(float(r[key]) for r in rows) / len(rows) if rows else math.nan

    # SQuAD v2.0's convention over every question: an abstention is right on an unanswerable one
    overall = [
        (float(r["abstained"]), float(r["abstained"])) if r["impossible"] else (r["em"], r["f1"])
        for r in records
    ]
    return {
        "questions": len(records),
        "answerable": len(answerable),
        "unanswerable": len(records) - len(answerable),
        "exact_match": mean(answerable, "em"),
        "f1": mean(answerable, "f1"),
        "rouge_l": mean(answerable, "rouge_l"),
        "answer_contains": mean(answerable, "contains"),
        "answered_rate": len(answered) / len(answerable) if answerable else math.nan,
        "exact_match_answered": mean(answered, "em"),
        "f1_answered": mean(answered, "f1"),
        "context_recall": mean(answerable, "gold_in_context"),
        "cited_rate": len(cited) / len(answered) if answered else math.nan,
        "citation_accuracy": mean(cited, "citation_correct"),
        "abstention": precision_recall((r["abstained"] for r in records), (r["impossible"] for r in records)),
        "abstained_by_reason": {
            reason: sum(r["reason"] == reason for r in records)
            for reason in sorted({r["reason"] for r in records if r["reason"]})
        },
        "perplexity": math.exp(sum(r["nll"] for r in scored) / tokens) if tokens else math.nan,
        "perplexity_tokens": tokens,
        "v2_exact_match": sum(em for em, _ in overall) / len(overall) if overall else math.nan,
        "v2_f1": sum(f1 for _, f1 in overall) / len(overall) if overall else math.nan,
    }


def eval_rag(
    base: Settings,
    dataset: Path,
    *,
    corpus: Path | None = None,
    split: str = "heldout",
    sample: int | None = 200,
    seed: int = 0,
    mode: str | None = None,
    index: str | None = None,
    out_dir: Path = Path("out/eval"),
) -> dict[str, Any]:
    qrels_file = dataset / "qrels_all.tsv" if (dataset / "qrels_all.tsv").is_file() else dataset / "qrels.tsv"
    for path in (dataset / "queries.jsonl", qrels_file):
        if not path.is_file():
            raise ConfigError(f"{path} not found: --dataset needs BEIR layout (corpus, queries, qrels)")
    corpus_file = (corpus or dataset) / "corpus.jsonl"
    if index is None and not corpus_file.is_file():
        raise ConfigError(f"{corpus_file} not found")
    questions = load_questions(dataset)
    settings = eval_settings(base, dataset, index)
    rag = settings.serve.rag
    mode = mode or rag.mode
    ingest_s = open_index(settings, corpus_file if index is None else None)

    try:
        # QUESTIONS and retrieval, batched
        gold = load_qrels(dataset, qrels_file.name)
        chosen = [q for q in select(gold, split, sample, seed) if q in questions]
        texts = [questions[q]["text"] for q in chosen]
        vectors = Embedder(settings.embed).embed(texts) if mode != "keyword" else None
        searcher = Searcher(settings.serve.search, RayShards(settings), reranker=eval_reranker(settings))
        ranked = []
        for lo in range(0, len(chosen), 64):
            batch = slice(lo, lo + 64)
            ranked += asyncio.run(
                searcher.search_many(
                    texts[batch],
                    None if vectors is None else vectors[batch],
                    max(rag.k, ABSTAIN_POOL),
                    None,
                    mode,
                )
            )

        # ANSWER and SCORE
        answerer = Answerer(settings)
        answerer.warm_up()
        generator = answerer.generator if answerer.reader is None else None
        scorer = generator if isinstance(generator, LocalGenerator) else None  # needs token likelihoods
        _say(
            f"answering {len(chosen)} questions with {answerer.model_name} "
            f"({mode}, k {rag.k}, index {settings.index.name})"
        )
        records: list[dict[str, Any]] = []
        started = time.monotonic()
        for i, (qid, question, hits) in enumerate(zip(chosen, texts, ranked, strict=True), 1):
            row = questions[qid]
            references = [a for a in row["answers"] if a.strip()]
            impossible = bool(row.get("is_impossible")) or not references
            t = time.monotonic()
            result = answerer.answer(question, [r.hit for r in hits], [r.vector_score for r in hits], rag.k)
            hits = hits[: rag.k]  # the passages the prompt held; the pool only judged weak retrieval
            seconds = time.monotonic() - t
            passages = {h.chunk_id: h for h in result["passages"]}
            cited = [passages[c["chunk_id"]].text for c in result["citations"] if c["chunk_id"] in passages]
            answer = "" if result["abstained"] else result["answer"]
            nll, tokens = None, 0
            if scorer is not None and not impossible and hits:
                messages, _ = build_messages(
                    question, [r.hit for r in hits], rag.max_context_tokens, scorer.count_tokens
                )
                nll, tokens = scorer.score(messages, references[0])
            records.append(
                {
                    "id": qid,
                    "question": question,
                    "references": sorted(set(references)),
                    "impossible": impossible,
                    "answer": result["answer"],
                    "abstained": result["abstained"],
                    "reason": result["reason"],
                    "citations": [c["chunk_id"] for c in result["citations"]],
                    "citation_correct": bool(cited) and any(contains_answer(t, references) for t in cited),
                    "gold_in_context": any(h.hit.document_id in gold.get(qid, {}) for h in hits),
                    "em": best_over(exact_match, answer, references),
                    "f1": best_over(token_f1, answer, references),
                    "rouge_l": best_over(rouge_l, answer, references),
                    "contains": float(bool(answer) and contains_answer(answer, references)),
                    "nll": nll,
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                }
            )
            if i % 10 == 0 or i == len(chosen):
                s = summarise(records)
                _say(
                    f"  {i}/{len(chosen)}: EM {s['exact_match']:.3f}  F1 {s['f1']:.3f}  "
                    f"holds a reference {s['answer_contains']:.3f}  "
                    f"({(time.monotonic() - started) / i:.1f} s/question)"
                )
    finally:
        if index is None:  # a fresh index: its shard actors go (`--index NAME` reopens it)
            release_shards(settings)

    summary = summarise(records)
    report = {
        "machine": machine(),
        "dataset": str(dataset),
        "corpus": str(corpus_file),
        "split": split,
        "sample": sample,
        "seed": seed,
        "index": settings.index.name,
        "ingest_s": round(ingest_s, 1),
        "mode": mode,
        "k": rag.k,
        "min_score": rag.min_score,
        "embed_model": settings.embed.model,
        "generator": answerer.model_name,
        "backend": settings.serve.llm.backend,
        "no_answer_threshold": answerer.threshold if answerer.reader is not None else None,
        "rerank": settings.serve.search.rerank_model if settings.serve.search.rerank else None,
        "perplexity_note": None if scorer is not None else "the generator backend gives no token likelihoods",
        "seconds_per_question": (time.monotonic() - started) / len(records) if records else math.nan,
        **summary,
        "records": records,
    }
    abst = summary["abstention"]
    write_report(
        out_dir,
        report_name("rag", dataset, corpus, split)
        + ("-extractive" if answerer.reader is not None else "")
        + ("-rerank" if settings.serve.search.rerank else ""),
        report,
        [
            ("questions (answerable / unanswerable)", f"{summary['answerable']} / {summary['unanswerable']}"),
            ("exact match / F1 / ROUGE-L (answerable)", _fmt(summary, "exact_match", "f1", "rouge_l")),
            ("answer holds a reference answer (answerable)", _fmt(summary, "answer_contains")),
            (
                "answered rate / EM / F1 when answered",
                _fmt(summary, "answered_rate", "exact_match_answered", "f1_answered"),
            ),
            ("context recall (gold passage in the prompt)", _fmt(summary, "context_recall")),
            ("citation accuracy (cited passage holds an answer)", _fmt(summary, "citation_accuracy")),
            ("cited rate (answers with a citation)", _fmt(summary, "cited_rate")),
            ("abstention precision / recall", _fmt(abst, "precision", "recall")),
            ("perplexity of reference answers", _fmt(summary, "perplexity")),
            ("SQuAD v2 EM / F1 (abstaining right on unanswerable)", _fmt(summary, "v2_exact_match", "v2_f1")),
            ("generator / mode / k", f"{answerer.model_name} / {mode} / {rag.k}"),
        ],
    )
    return report


def _fmt(values: dict[str, Any], *keys: str) -> str:
    out = []
    for key in keys:
        v = values[key]
        out.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
    return " / ".join(out)
