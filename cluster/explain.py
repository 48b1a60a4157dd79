"""`riverbed explain "QUERY"`: one search with ``explain: true`` against the running app, printed
so a person can see why each hit ranks where it does."""

from __future__ import annotations

from typing import Any

import httpx

from schemas.errors import RetryableError
from schemas.settings import Settings


def explain(
    settings: Settings, query: str, k: int, mode: str, filter: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``/v1/search`` response for ``query`` with per-hit explanations."""
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    body: dict[str, Any] = {"query": query, "k": k, "mode": mode, "explain": True}
    if filter:
        body["filter"] = filter
    try:
        response = httpx.post(f"{url}/v1/search", json=body, timeout=60)
    except httpx.HTTPError as exc:
        raise RetryableError(
            f"no Riverbed app answers at {url} ({exc}): start `riverbed serve` first"
        ) from exc
    answer: dict[str, Any] = response.json()
    if response.status_code != 200:
        error = answer.get("error", {})
        raise RetryableError(
            f"{url}/v1/search answered {response.status_code}: {error.get('message', answer)}"
        )
    return answer


def format_explanation(answer: dict[str, Any]) -> str:
    """Each hit: its fused score and how vector and keyword search ranked it, then the chunk's
    text with the query words that matched marked ``[like this]``."""
    n, took = len(answer["hits"]), answer["took_ms"]
    lines = [f"{answer['mode']} search for {answer['query']!r}: {n} hits in {took:.0f} ms"]
    for i, hit in enumerate(answer["hits"], 1):
        ex = hit.get("explanation") or {}
        parts = [f"score {hit['score']:.4f}"]
        if ex.get("vector_rank") is not None:
            parts.append(f"vector #{ex['vector_rank']} ({ex['vector_score']:.3f} cosine)")
        elif answer["mode"] != "keyword":
            parts.append("vector: not in its candidates")
        if ex.get("keyword_rank") is not None:
            parts.append(f"keyword #{ex['keyword_rank']} ({ex['keyword_score']:.2f} BM25)")
        elif answer["mode"] != "vector":
            parts.append("keyword: no match in its candidates")
        if ex.get("rerank_score") is not None:
            parts.append(f"reranked ({ex['rerank_score']:.3f})")
        lines.append(f"\n{i}. {hit['chunk_id']}  [{hit['title']}]  " + ", ".join(parts))
        lines.append("   " + _marked(hit["text"], ex.get("matched_terms", [])))
    return "\n".join(lines)


def _marked(text: str, terms: list[dict[str, Any]], width: int = 400) -> str:
    """``text`` with each matched term bracketed (``text_start``/``text_end``: offsets in the hit's
    text; ``start``/``end`` are the document's)."""
    out, last = [], 0
    for term in sorted(terms, key=lambda t: t["text_start"]):
        a, b = term["text_start"], term["text_end"]
        if a < last or b > len(text):
            continue
        out.append(text[last:a] + "[" + text[a:b] + "]")
        last = b
    out.append(text[last:])
    marked = " ".join("".join(out).split())
    return marked if len(marked) <= width else marked[: width - 3] + "..."
