"""Retrieval and answer metrics (pure functions).

Retrieval, over ranked document ids.

Ranks are counted per document: a document's chunks collapse to its best-ranked chunk
(:func:`documents_in_order`). Relevance is graded by the qrels score (> 0 is relevant);
nDCG uses the grades as gains, recall the set of relevant documents.

Answers, over strings: exact match and token F1 exactly as SQuAD's official scripts compute them
(:func:`normalize_answer`), ROUGE-L on the same normalised tokens; each question scores against
its closest reference answer (:func:`best_over`).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence


def documents_in_order(document_ids: Iterable[str]) -> list[str]:
    """Each document once, at the rank of its first (best) chunk."""
    return list(dict.fromkeys(document_ids))


def recall_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top ``k`` (0 when none is relevant)."""
    wanted = {d for d, grade in relevant.items() if grade > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def all_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """1 when every relevant document is in the top ``k`` (a multi-hop question's supporting
    passages all found), else 0 (and 0 when none is relevant)."""
    wanted = {d for d, grade in relevant.items() if grade > 0}
    return float(bool(wanted) and wanted <= set(ranked[:k]))


def mrr_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """1 / rank of the first relevant document within the top ``k``, else 0."""
    for rank, doc in enumerate(ranked[:k], 1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    """Normalised discounted cumulative gain at ``k``, gains = qrels grades."""
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], 1))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, 1))
    return dcg / idcg if idcg else 0.0


RECALL_AT = (1, 5, 10, 20)
ALL_AT = (2, 5, 10)


def score_run(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean recall@1/5/10/20, all@2/5/10 (every relevant document in the top k), MRR@10 and
    nDCG@10 over the queries of ``qrels`` (a query
    missing from ``runs`` counts as finding nothing)."""
    out: dict[str, float] = {}
    n = len(qrels)
    if n == 0:
        empty = {f"recall@{k}": 0.0 for k in RECALL_AT} | {f"all@{k}": 0.0 for k in ALL_AT}
        return {**empty, "mrr@10": 0.0, "ndcg@10": 0.0, "queries": 0}
    for k in RECALL_AT:
        out[f"recall@{k}"] = sum(recall_at(runs.get(q, []), rel, k) for q, rel in qrels.items()) / n
    for k in ALL_AT:
        out[f"all@{k}"] = sum(all_at(runs.get(q, []), rel, k) for q, rel in qrels.items()) / n
    out["mrr@10"] = sum(mrr_at(runs.get(q, []), rel) for q, rel in qrels.items()) / n
    out["ndcg@10"] = sum(ndcg_at(runs.get(q, []), rel) for q, rel in qrels.items()) / n
    out["queries"] = n
    return out


# ANSWERS
# SQuAD's official normalisation (evaluate-v1.1.py / evaluate-v2.0.py): lower case, punctuation
# removed, the articles a/an/the removed, whitespace collapsed.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall of the normalised strings (multiset overlap);
    as SQuAD's script, 1.0 when both are empty and 0.0 when only one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common token subsequence of the normalised
    strings (0.0 when either is empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    lcs = _lcs_length(pred, ref) if pred and ref else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over(metric: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """The metric against the closest reference (SQuAD scores each question by its best match);
    0.0 without references."""
    return max((metric(prediction, r) for r in references), default=0.0)


def contains_answer(text: str, references: Sequence[str]) -> bool:
    """True when the normalised ``text`` holds some normalised, non-empty reference as whole words."""
    haystack = f" {normalize_answer(text)} "
    return any((needle := normalize_answer(r)) and f" {needle} " in haystack for r in references)


def precision_recall(predicted: Iterable[bool], actual: Iterable[bool]) -> dict[str, float | int]:
    """Precision and recall of a yes/no prediction (here: abstained vs unanswerable) and the counts
    behind them; a ratio without a denominator is NaN, never 0 (it was not measured)."""
    pairs = list(zip(predicted, actual, strict=True))
    tp = sum(p and a for p, a in pairs)
    predicted_n, actual_n = sum(p for p, _ in pairs), sum(a for _, a in pairs)
    return {
        "precision": tp / predicted_n if predicted_n else math.nan,
        "recall": tp / actual_n if actual_n else math.nan,
        "true_positives": tp,
        "predicted": predicted_n,
        "actual": actual_n,
    }
