"""Extractive reading: the answer to a question as a span of one of the passages, or none.

:class:`ExtractiveReader` runs a question-answering model (start and end logits per token: a
``AutoModelForQuestionAnswering``, such as the one `riverbed finetune reader` trains) over
question + passage windows (passages longer than one window are read in overlapping windows).

- **A window's best span** maximises start + end logit over passage tokens, the end at or after
  the start and at most ``max_answer_tokens`` apart.
- **Its no-answer score** is the first token's start + end logit (the trainer points every
  window without the answer there). The span's **margin** is its score minus that: above the
  abstention threshold the reader answers.
- **Across passages and windows** the span with the highest margin wins (margins compare across
  windows; raw logits drift with each window's length and content).

The answer is the passage's own characters (token offsets map back to the text), so the citation
is exact. :func:`calibrate_threshold` picks the threshold from scored questions.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.embedder import cpu_threads
from actors.models import TRAINING_RECORD, resolve_text_model
from schemas.settings import FinetuneConfig, GeneratorConfig

log = logging.getLogger(__name__)

WINDOWS_PER_BATCH = 16


@dataclass(frozen=True)
class ReadSpan:
    """The best answer found: ``passage`` (index into the passages read), ``start``/``end``
    (characters of that passage), its ``text``, ``score`` (start + end logit) and ``margin``
    (score minus the window's no-answer score). ``passage`` is -1 when nothing could be read
    (no passages, or no passage tokens fit beside the question)."""

    passage: int
    start: int
    end: int
    text: str
    score: float
    margin: float


NOTHING = ReadSpan(-1, 0, 0, "", -math.inf, -math.inf)


def best_span(
    start_logits: Sequence[float],
    end_logits: Sequence[float],
    offsets: Sequence[tuple[int, int] | None],
    max_answer_tokens: int,
) -> tuple[int, int, float] | None:
    """``(first token, last token, score)`` of the best span of passage tokens (``offsets[t]`` not
    None), or None when the window has no passage token."""
    inside = [t for t, o in enumerate(offsets) if o is not None]
    if not inside:
        return None
    best: tuple[int, int, float] | None = None
    # The best end for each start within reach: O(tokens * max_answer_tokens), fine for windows.
    for i, s in enumerate(inside):
        for e in inside[i : i + max_answer_tokens]:
            score = start_logits[s] + end_logits[e]
            if best is None or score > best[2]:
                best = (s, e, score)
    return best


def abstention_outcome(scored: Sequence[tuple[float, float | None]], threshold: float) -> dict[str, float]:
    """What a threshold does on ``scored`` questions (each ``(margin, f1)``, ``f1`` None for an
    unanswerable one; the reader answers when the margin is above the threshold):
    ``{"threshold", "v2_f1", "abstention_precision", "abstention_recall", "answered",
    "answerable_f1"}``; ``v2_f1`` is SQuAD v2's F1 (an abstention on an unanswerable question
    scores 1), ``answered`` and ``answerable_f1`` are over the answerable questions."""
    total, abstained, right, answered, answerable_f1 = 0.0, 0, 0, 0, 0.0
    impossible = sum(1 for _, f1 in scored if f1 is None)
    for margin, f1 in scored:
        if margin > threshold:
            total += f1 or 0.0
            answered += f1 is not None
            answerable_f1 += f1 or 0.0
        else:
            abstained += 1
            right += f1 is None
            total += 1.0 if f1 is None else 0.0
    possible = max(1, len(scored) - impossible)
    return {
        "threshold": round(threshold, 4) if math.isfinite(threshold) else -1e9,
        "v2_f1": round(total / max(1, len(scored)), 4),
        "abstention_precision": round(right / abstained, 4) if abstained else 0.0,
        "abstention_recall": round(right / impossible, 4) if impossible else 0.0,
        "answered": round(answered / possible, 4),
        "answerable_f1": round(answerable_f1 / possible, 4),
    }


def calibrate_threshold(scored: Sequence[tuple[float, float | None]]) -> dict[str, Any]:
    """The abstention threshold that scores best on ``scored`` questions by SQuAD v2's F1 (see
    :func:`abstention_outcome`). Returns ``{"threshold", "calibration_f1",
    "calibration_abstention_precision", "calibration_abstention_recall", "calibration_curve"}``;
    the curve is :func:`abstention_outcome` at every tenth percentile of the margins and at the
    threshold chosen, so a user can pick another trade-off (``serve.llm.no_answer_threshold``)."""
    if not scored:
        raise ValueError("no scored questions to calibrate on")
    margins = sorted({m for m, _ in scored if math.isfinite(m)})
    midpoints = [(a + b) / 2 for a, b in itertools.pairwise(margins)]
    candidates = [-math.inf, *midpoints, *([margins[-1] + 1] if margins else [])]
    best = max(
        candidates,
        key=lambda t: (abstention_outcome(scored, t)["v2_f1"], -abs(t) if math.isfinite(t) else -math.inf),
    )
    chosen = abstention_outcome(scored, best)
    deciles = (
        [margins[min(len(margins) - 1, len(margins) * i // 10)] for i in range(1, 10)] if margins else []
    )
    curve = sorted(
        {t: abstention_outcome(scored, t) for t in [*deciles, best]}.values(), key=lambda r: r["threshold"]
    )
    return {
        "threshold": best if math.isfinite(best) else -1e9,
        "calibration_f1": chosen["v2_f1"],
        "calibration_abstention_precision": chosen["abstention_precision"],
        "calibration_abstention_recall": chosen["abstention_recall"],
        "calibration_curve": curve,
    }


class ExtractiveReader:
    """Reads questions against passages with a question-answering model at ``location`` (a
    directory or id). Thread-safe; loads on first use (or :meth:`warm_up`)."""

    def __init__(
        self,
        location: str,
        max_tokens: int = 384,
        stride: int = 128,
        max_answer_tokens: int = 30,
        device: str = "auto",
        num_cpus: float | None = None,
    ) -> None:
        self.location = location
        self.model_name = location
        self.max_tokens = max_tokens
        self.stride = stride
        self.max_answer_tokens = max_answer_tokens
        self._device = device
        self._threads = cpu_threads(num_cpus)
        self._loaded: tuple[Any, Any, str] | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        self._load()

    def count_tokens(self, text: str) -> int:
        return len(self._load()[1](text, add_special_tokens=False)["input_ids"])

    def _load(self) -> tuple[Any, Any, str]:
        with self._lock:
            if self._loaded is None:
                import torch
                from transformers import AutoModelForQuestionAnswering, AutoTokenizer

                device = self._device
                if device == "auto":
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                if device == "cpu":
                    torch.set_num_threads(self._threads)
                model = AutoModelForQuestionAnswering.from_pretrained(self.location).to(device).eval()
                tokenizer = AutoTokenizer.from_pretrained(self.location)
                self._loaded = (model, tokenizer, device)
            return self._loaded

    def read(self, question: str, passages: Sequence[str]) -> ReadSpan:
        """The best span over ``passages`` (see the module docstring), or :data:`NOTHING`."""
        if not passages:
            return NOTHING
        import torch

        model, tokenizer, device = self._load()
        encoded = tokenizer(
            [question] * len(passages),
            list(passages),
            truncation="only_second",
            max_length=self.max_tokens,
            stride=self.stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        source = encoded.pop("overflow_to_sample_mapping").tolist()
        offsets = encoded.pop("offset_mapping").tolist()
        best = NOTHING
        with torch.inference_mode():
            for lo in range(0, len(source), WINDOWS_PER_BATCH):
                batch = {k: v[lo : lo + WINDOWS_PER_BATCH].to(device) for k, v in encoded.items()}
                out = model(**batch)
                starts, ends = out.start_logits.float().cpu().tolist(), out.end_logits.float().cpu().tolist()
                for j, (s_logits, e_logits) in enumerate(zip(starts, ends, strict=True)):
                    w = lo + j
                    sequence_ids = encoded.sequence_ids(w)
                    window = [
                        (int(o[0]), int(o[1])) if sequence_ids[t] == 1 else None
                        for t, o in enumerate(offsets[w])
                    ]
                    found = best_span(s_logits, e_logits, window, self.max_answer_tokens)
                    if found is None:
                        continue
                    s, e, score = found
                    margin = score - (s_logits[0] + e_logits[0])
                    if margin > best.margin:
                        a, b = window[s][0], window[e][1]  # type: ignore[index]
                        passage = passages[source[w]]
                        best = ReadSpan(source[w], a, b, passage[a:b], score, margin)
        return best


def make_reader(
    config: GeneratorConfig, finetune: FinetuneConfig, cache_dir: Path, passages: int | None = None
) -> tuple[ExtractiveReader, float]:
    """The reader ``config.reader_model`` names (Riverbed's own from the cache, or any
    question-answering model) and its abstention threshold: ``config.no_answer_threshold``, else
    the one it was calibrated with, else 0. ``passages``: how many it will read per question
    (``serve.rag.k``); a calibrated threshold set reading another number is logged as a warning
    (the best margin of more passages runs higher)."""
    resolved = resolve_text_model(config.reader_model, finetune, cache_dir)
    threshold = config.no_answer_threshold
    record = Path(resolved.location) / TRAINING_RECORD
    if threshold is None and record.is_file():
        trained = json.loads(record.read_text())
        threshold = trained.get("threshold")
        calibrated_on = trained.get("finetune", {}).get("calibration_passages", 1)
        if passages is not None and threshold is not None and passages != calibrated_on:
            log.warning(
                "reader %s: its abstention threshold was calibrated reading %d passages a question, "
                "and serve.rag.k is %d: set serve.rag.k to %d (or serve.llm.no_answer_threshold)",
                resolved.name, calibrated_on, passages, calibrated_on,
            )  # fmt: skip
    shape = finetune.reader
    reader = ExtractiveReader(
        resolved.location, shape.max_tokens, shape.stride, shape.max_answer_tokens, config.device
    )
    reader.model_name = resolved.name
    return reader, float(threshold) if threshold is not None else 0.0
