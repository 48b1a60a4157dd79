"""Generator deployment: retrieved passages + question → an answer with citations, or abstention.

Abstains without generating when retrieval is weak (the best passage's vector score is below
``serve.rag.min_score``: nothing close to the question is indexed), and after generating when the
model says the passages do not hold the answer. The model (``serve.llm``) is loaded once per
replica; the local backend keeps a converted copy of GGUF models in the model cache.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from actors.generator import make_generator
from actors.vector_index import Hit
from deployments.rag import abstain_for_weak_retrieval, build_messages, parse_answer, refine_span
from schemas.settings import Settings


@serve.deployment
class Generator:
    def __init__(self, settings: Settings) -> None:
        self.config = settings.serve.rag
        self.generator = make_generator(settings.serve.llm, settings.cache_dir)
        self.generator.warm_up()
        self._lock = asyncio.Lock()  # one generation at a time per replica: they share the cores

    async def answer(self, question: str, hits: list[Hit], best_vector_score: float | None) -> dict[str, Any]:
        """``{"answer", "abstained", "reason", "citations": [Citation fields], "passages": [Hit],
        "model"}``; ``passages`` are those the prompt held, in prompt order."""
        weak = abstain_for_weak_retrieval(hits, best_vector_score, self.config.min_score)
        if weak is not None:
            return self._result(weak, [])
        messages, used = build_messages(
            question, hits, self.config.max_context_tokens, self.generator.count_tokens
        )
        async with self._lock:
            generation = await asyncio.to_thread(self.generator.generate, messages)
        return self._result(parse_answer(generation.text, used), used)

    def _result(self, answer: Any, passages: list[Hit]) -> dict[str, Any]:
        citations = []
        for citation in answer.citations:
            refined = refine_span(answer.answer, citation)
            citations.append(
                {
                    "number": refined.number,
                    "chunk_id": refined.chunk_id,
                    "document_id": refined.document_id,
                    "span": tuple(refined.span),
                    "text": refined.text,
                }
            )
        return {
            "answer": answer.answer,
            "abstained": answer.abstained,
            "reason": answer.reason,
            "citations": citations,
            "passages": passages,
            "model": self.generator.model_name,
        }
