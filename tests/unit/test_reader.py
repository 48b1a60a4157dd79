"""The extractive reader: span search, threshold calibration, reading with a real (untrained-head)
MiniLM question-answering model saved as `riverbed finetune reader` saves one, and the RAG
backend's answers (exact citations) and abstentions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from actors.models import TRAINING_RECORD, resolve_model
from actors.reader import NOTHING, ExtractiveReader, best_span, calibrate_threshold, make_reader
from actors.vector_index import Hit
from deployments.generator import Answerer
from schemas.errors import ConfigError
from schemas.settings import TRAINED_READER, FinetuneConfig, GeneratorConfig, load_settings


def test_best_span_stays_in_the_passage_in_order_and_short():
    starts = [9.0, 1.0, 0.0, 5.0, 0.0]
    ends = [9.0, 0.0, 2.0, 0.0, 7.0]
    offsets = [None, (0, 3), (4, 7), (8, 11), (12, 15)]  # token 0 is not passage text
    assert best_span(starts, ends, offsets, 30) == (3, 4, 12.0)
    assert best_span(starts, ends, offsets, 1) == (4, 4, 7.0)  # one token at most
    assert best_span(starts, ends, [None] * 5, 30) is None


def test_calibration_picks_the_threshold_that_scores_best():
    # answerable questions answered right have high margins; unanswerable ones low
    scored = [(5.0, 1.0), (4.0, 0.5), (1.0, None), (0.5, None), (3.0, None), (-1.0, 0.0)]
    result = calibrate_threshold(scored)
    t = result["threshold"]
    assert 3.0 < t < 4.0  # abstains on everything at or below 3
    assert result["calibration_f1"] == pytest.approx((1 + 0.5 + 1 + 1 + 1 + 0) / 6, abs=1e-4)
    assert result["calibration_abstention_precision"] == pytest.approx(3 / 4)
    assert result["calibration_abstention_recall"] == 1.0
    # the curve: each tenth percentile of the margins and the chosen threshold, in order
    curve = result["calibration_curve"]
    assert [row["threshold"] for row in curve] == sorted(row["threshold"] for row in curve)
    chosen = next(row for row in curve if row["threshold"] == round(t, 4))
    assert chosen["answered"] == pytest.approx(2 / 3, abs=1e-4)
    assert chosen["answerable_f1"] == pytest.approx(0.5)
    lowest = curve[0]  # at the lowest margin, only that question (answerable, margin -1) abstains
    assert lowest["threshold"] == -1.0 and lowest["abstention_precision"] == 0.0
    assert lowest["answered"] == pytest.approx(2 / 3, abs=1e-4) and lowest["abstention_recall"] == 0.0
    everything = calibrate_threshold([(1.0, 1.0), (2.0, 0.8)])
    assert everything["threshold"] < 1.0  # nothing unanswerable: answer all
    with pytest.raises(ValueError):
        calibrate_threshold([])


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    location = resolve_model("sentence-transformers/all-MiniLM-L6-v2").location
    target = tmp_path_factory.mktemp("qa")
    AutoModelForQuestionAnswering.from_pretrained(location).save_pretrained(target)
    AutoTokenizer.from_pretrained(location).save_pretrained(target)
    (target / TRAINING_RECORD).write_text(json.dumps({"threshold": 1.25}))
    return target


PASSAGES = [
    "Warsaw is the capital and largest city of Poland. " * 8,
    "The Normans gave their name to Normandy, a region in France.",
]


def test_reading_gives_a_span_of_one_passage_with_its_own_offsets(qa_model):
    reader = ExtractiveReader(str(qa_model), max_tokens=48, stride=16, max_answer_tokens=5, num_cpus=1)
    span = reader.read("What is the capital of Poland?", PASSAGES)
    assert span.passage in (0, 1)
    assert PASSAGES[span.passage][span.start : span.end] == span.text and span.text
    assert math.isfinite(span.margin) and math.isfinite(span.score)
    assert reader.read("anything", []) is NOTHING


def test_make_reader_takes_the_calibrated_threshold_unless_one_is_set(qa_model, tmp_path, caplog):
    finetune = FinetuneConfig()
    config = GeneratorConfig(backend="extractive", reader_model=str(qa_model))
    assert make_reader(config, finetune, tmp_path)[1] == 1.25
    # its record names no calibration_passages: calibrated reading one passage; serving 3 is worth a word
    assert make_reader(config, finetune, tmp_path, passages=1)[1] == 1.25 and "calibrated" not in caplog.text
    make_reader(config, finetune, tmp_path, passages=3)
    assert "calibrated reading 1 passages a question, and serve.rag.k is 3" in caplog.text
    assert make_reader(config.model_copy(update={"no_answer_threshold": -2.0}), finetune, tmp_path)[1] == -2.0
    with pytest.raises(ConfigError, match="riverbed finetune reader"):
        make_reader(GeneratorConfig(backend="extractive", reader_model=TRAINED_READER), finetune, tmp_path)


def _hits() -> list[Hit]:
    return [
        Hit(f"d{i}#0", f"d{i}", 0, text, None, 100, 100 + len(text), {}, 0.9)
        for i, text in enumerate(PASSAGES)
    ]


def _answerer(qa_model: Path, tmp_path: Path, threshold: float) -> Answerer:
    settings = load_settings(
        overrides={
            "home": str(tmp_path / "home"),
            "cache_dir": str(tmp_path / "cache"),
            "serve": {
                "llm": {
                    "backend": "extractive",
                    "reader_model": str(qa_model),
                    "no_answer_threshold": threshold,
                }
            },
        }
    )
    return Answerer(settings)


def test_the_extractive_backend_answers_with_the_span_and_cites_exactly_its_words(qa_model, tmp_path):
    answerer = _answerer(qa_model, tmp_path, -1e9)
    result = answerer.answer("What is the capital of Poland?", _hits(), [0.9, 0.8], 2)
    assert not result["abstained"] and result["answer"]
    [citation] = result["citations"]
    hit = next(h for h in _hits() if h.chunk_id == citation["chunk_id"])
    a, b = citation["span"]
    assert citation["text"] == result["answer"] == hit.text[a - hit.start : b - hit.start]
    assert result["model"] == str(qa_model)


def test_the_extractive_backend_abstains_below_the_threshold_and_on_weak_retrieval(qa_model, tmp_path):
    answerer = _answerer(qa_model, tmp_path, 1e9)
    result = answerer.answer("What is the capital of Poland?", _hits(), [0.9, 0.8], 2)
    assert result["abstained"] and result["reason"] == "model_abstained" and not result["citations"]
    weak = _answerer(qa_model, tmp_path, -1e9).answer("q", _hits(), [0.01, 0.02], 2)
    assert weak["abstained"] and weak["reason"] == "weak_retrieval"
