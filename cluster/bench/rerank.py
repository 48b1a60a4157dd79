"""`riverbed bench rerank`: what reranking costs a query, one query at a time.

# PAIRS: held-out SQuAD v1.1 questions (odd stable_hash of the id), each with ``candidates``
#   passages: its gold passage and the others of the same article, then of the next ones (the near
#   misses a search returns are of that kind and length)
# TIMING: ``Reranker.score`` per question after a warm-up, as the searcher calls it for one query
#   (``serve.search.rerank_candidates`` pairs, ``serve.search.rerank_max_tokens``); p50 / p90 /
#   p99 and pairs per second. The model is ``serve.search.rerank_model``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.reranker import Reranker
from cluster.bench.report import machine, write_report
from cluster.finetune_text import SQUAD_V1, read_beir
from schemas.ids import in_tune_split
from schemas.settings import Settings


def bench_rerank(settings: Settings, out_dir: Path, queries: int = 200) -> dict[str, Any]:
    search = settings.serve.search
    passages, gold, questions = read_beir(SQUAD_V1)
    order = list(passages)
    chosen = [q for q in sorted(gold) if q in questions and not in_tune_split(q)][:queries]
    reranker = Reranker(search, settings.cache_dir, settings.finetune)
    reranker.warm_up()
    n = search.rerank_candidates
    groups = []
    for q in chosen:
        at = order.index(gold[q])
        article = passages[gold[q]]["title"]
        start = next(i for i in range(at, -1, -1) if i == 0 or passages[order[i - 1]]["title"] != article)
        ids = order[start : start + n] if start + n <= len(order) else order[-n:]
        groups.append((questions[q]["text"], [(passages[i]["title"], passages[i]["text"]) for i in ids]))
    for query, group in groups[:5]:
        reranker.score(query, group)
    times = []
    for query, group in groups:
        t0 = time.perf_counter()
        reranker.score(query, group)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000
    result = {
        "machine": machine(),
        "model": reranker.model_name,
        "location": reranker.location,
        "queries": len(groups),
        "candidates": n,
        "max_tokens": search.rerank_max_tokens,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p90_ms": round(float(np.percentile(ms, 90)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "pairs_per_s": round(n * len(groups) / float(np.sum(times)), 1),
    }
    write_report(
        out_dir,
        "rerank",
        result,
        [
            ("model", f"{result['model']} ({result['location']})"),
            ("queries / candidates each / max tokens", f"{len(groups)} / {n} / {search.rerank_max_tokens}"),
            ("p50 / p90 / p99 per query", f"{result['p50_ms']} / {result['p90_ms']} / {result['p99_ms']} ms"),
            ("pairs per second", str(result["pairs_per_s"])),
        ],
    )
    return result
