"""Generator deployment: retrieved passages + question → an answer with citations, or abstention.

Abstains without generating when retrieval is weak (the best passage's vector score is below
``serve.rag.min_score``: nothing close to the question is indexed), and after generating when the
model says the passages do not hold the answer. With ``serve.llm.backend: extractive`` a reader
(:mod:`actors.reader`) answers instead: a span of one passage, cited exactly, or an abstention
when the span does not beat the no-answer score by more than the threshold. The model
(``serve.llm``) is loaded once per replica; the local backend keeps a converted copy of GGUF
models in the model cache.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from actors.generator import Generator as LLM
from actors.generator import Message, make_generator
from actors.reader import ExtractiveReader, make_reader
from actors.vector_index import Hit
from deployments.rag import (
    ABSTENTION,
    RagAnswer,
    abstain_for_weak_retrieval,
    build_messages,
    parse_answer,
    refine_span,
    span_answer,
)
from schemas.settings import Settings

ABSTAIN_POOL = 10
"""Hits retrieved for a RAG question at the least: weak retrieval is judged on all of them, the
prompt holds the first ``k``."""


class Answerer:
    """The answering logic without Serve: what the deployment runs, and what ``riverbed eval rag``
    runs in-process. One call at a time (the model is not re-entrant)."""

    def __init__(self, settings: Settings) -> None:
        self.config = settings.serve.rag
        llm = settings.serve.llm
        self.reader: ExtractiveReader | None = None
        self.threshold = 0.0
        self._generator: LLM | None = None
        if llm.backend == "extractive":
            self.reader, self.threshold = make_reader(
                llm, settings.finetune, settings.cache_dir, settings.serve.rag.k
            )
        else:
            self._generator = make_generator(llm, settings.cache_dir)

    @property
    def generator(self) -> LLM:
        """The generative model (not with the extractive backend)."""
        if self._generator is None:
            raise RuntimeError("the extractive backend has no generator")
        return self._generator

    @property
    def model_name(self) -> str:
        return self.reader.model_name if self.reader is not None else self.generator.model_name

    def warm_up(self) -> None:
        (self.reader or self.generator).warm_up()

    def prompt(
        self, question: str, hits: list[Hit], vector_scores: list[float | None], k: int | None = None
    ) -> PromptPlan:
        """The abstention for weak retrieval, or the messages to generate from and the hits they hold.

        Weak retrieval is judged on every hit given (callers pass a pool of candidates: with few
        passages, say one, the best fused hit is often one only keyword search found, which has no
        vector score); the prompt holds the first ``k`` (all when None)."""
        weak = self._weak(hits, vector_scores)
        if weak is not None:
            return PromptPlan(weak, [], [])
        messages, used = build_messages(
            question, hits[:k], self.config.max_context_tokens, self.generator.count_tokens
        )
        return PromptPlan(None, messages, used)

    def _weak(self, hits: list[Hit], vector_scores: list[float | None]) -> RagAnswer | None:
        """The abstention for weak retrieval, or None. Judged on vector scores (rag.min_score's
        scale); hits only keyword search found have none, and with no vector score at all
        (keyword mode) only "no passages" abstains here."""
        scored = [replace(h, score=v) for h, v in zip(hits, vector_scores, strict=True) if v is not None]
        return abstain_for_weak_retrieval(
            scored if scored else hits, self.config.min_score if scored else -1.0
        )

    def answer(
        self, question: str, hits: list[Hit], vector_scores: list[float | None], k: int | None = None
    ) -> dict[str, Any]:
        """``{"answer", "abstained", "reason", "citations": [Citation fields], "passages": [Hit],
        "model"}``; ``passages`` are those the prompt held, in prompt order. ``vector_scores[i]``:
        the cosine of ``hits[i]`` with the question (None when only keyword search found it)."""
        if self.reader is not None:
            return self._read(question, hits, vector_scores, k)
        plan = self.prompt(question, hits, vector_scores, k)
        if plan.abstention is not None:
            return self.result(plan.abstention, [])
        generation = self.generator.generate(plan.messages)
        return self.result(parse_answer(generation.text, plan.passages, question=question), plan.passages)

    def _read(
        self, question: str, hits: list[Hit], vector_scores: list[float | None], k: int | None
    ) -> dict[str, Any]:
        """The extractive backend: weak retrieval abstains as for generation; else the reader's
        best span over the first ``k`` hits, cited exactly, or an abstention when its margin over
        the no-answer score is at most the threshold (``reason="model_abstained"``)."""
        weak = self._weak(hits, vector_scores)
        if weak is not None:
            return self.result(weak, [])
        assert self.reader is not None
        passages = hits[:k]
        span = self.reader.read(question, [h.text for h in passages])
        if span.passage < 0 or span.margin <= self.threshold or not span.text.strip():
            return self.result(RagAnswer(ABSTENTION, abstained=True, reason="model_abstained"), passages)
        return self.result(span_answer(span, passages), passages)

    def result(self, answer: RagAnswer, passages: list[Hit]) -> dict[str, Any]:
        citations = []
        for c in answer.citations:
            start, end = refine_span(answer.answer, c)
            # narrowed to the answer's own words where they appear verbatim: text and span agree
            offset = start - c.span[0]
            text = c.text[offset : offset + end - start] if (start, end) != tuple(c.span) else c.text
            citations.append(
                {"number": c.number, "chunk_id": c.chunk_id, "document_id": c.document_id,
                 "span": (start, end), "text": text}
            )  # fmt: skip
        return {
            "answer": answer.answer,
            "abstained": answer.abstained,
            "reason": answer.reason,
            "citations": citations,
            "passages": passages,
            "model": self.model_name,
        }


@dataclass(frozen=True)
class PromptPlan:
    """:meth:`Answerer.prompt`'s outcome: ``abstention`` (nothing to generate), or the ``messages``
    and the ``passages`` they number."""

    abstention: RagAnswer | None
    messages: list[Message]
    passages: list[Hit]


@serve.deployment
class Generator:
    def __init__(self, settings: Settings) -> None:
        self.answerer = Answerer(settings)
        self.answerer.warm_up()
        self._lock = asyncio.Lock()  # one generation at a time per replica: they share the cores

    async def answer(
        self, question: str, hits: list[Hit], vector_scores: list[float | None], k: int | None = None
    ) -> dict[str, Any]:
        """:meth:`Answerer.answer`, on a worker thread."""
        async with self._lock:
            return await asyncio.to_thread(self.answerer.answer, question, hits, vector_scores, k)
