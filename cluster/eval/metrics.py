"""Retrieval metrics over ranked document ids (pure functions).

Ranks are counted per document: a document's chunks collapse to its best-ranked chunk
(:func:`documents_in_order`). Relevance is graded by the qrels score (> 0 is relevant);
nDCG uses the grades as gains, recall the set of relevant documents.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def documents_in_order(document_ids: Iterable[str]) -> list[str]:
    """Each document once, at the rank of its first (best) chunk."""
    return list(dict.fromkeys(document_ids))


def recall_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top ``k`` (0 when none is relevant)."""
    wanted = {d for d, grade in relevant.items() if grade > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


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


def score_run(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean recall@1/5/10/20, MRR@10 and nDCG@10 over the queries of ``qrels`` (a query
    missing from ``runs`` counts as finding nothing)."""
    out: dict[str, float] = {}
    n = len(qrels)
    if n == 0:
        return {**{f"recall@{k}": 0.0 for k in RECALL_AT}, "mrr@10": 0.0, "ndcg@10": 0.0, "queries": 0}
    for k in RECALL_AT:
        out[f"recall@{k}"] = sum(recall_at(runs.get(q, []), rel, k) for q, rel in qrels.items()) / n
    out["mrr@10"] = sum(mrr_at(runs.get(q, []), rel) for q, rel in qrels.items()) / n
    out["ndcg@10"] = sum(ndcg_at(runs.get(q, []), rel) for q, rel in qrels.items()) / n
    out["queries"] = n
    return out
