"""`riverbed finetune reranker` and `riverbed finetune reader`: Riverbed's own text models.

# DATA: the tune split only (even stable_hash of the question id); held-out questions are never
#       read, and a tune question whose text is also a held-out question's (SQuAD v2.0 repeats v1.1's
#       answerable questions) is left out too
# BASE: ``finetune.*.base_model``, a hub id or path, or a model Riverbed trains, found in the cache
#       (the reranker starts from the reader's encoder by default: train the reader first); the
#       base's cache name joins the model's own cache key
# MINE (reranker): the corpus in an index (the real pipeline into a fresh one, or ``--index``);
#       per question Riverbed's own vector and keyword search, ``mine_depth`` hits each; the hits
#       of other documents are its hard negatives, a hit of its gold document holding an answer
#       its positive (else the gold passage itself)
# READ (reader): question + gold passage with the answer's place in it; unanswerable questions
#       with the passage they were written against; per answerable question ``distractors`` other
#       passages of its article (those sharing most words with it, holding none of its answers)
#       as no-answer examples, since the served reader reads retrieval's top k and most of those
#       do not answer; a seeded fifth of the unanswerable-question set's tune questions is kept
#       out of training to set the abstention threshold on
# TRAIN: cluster.text_training.train_loop on Ray Train (``finetune.*.workers``, CPU or GPU)
# CALIBRATE (reader): each kept-out question read against its passage and the
#       ``calibration_passages`` - 1 distractors of its article (as serving reads k passages: the
#       best margin of several is higher than one passage's); the threshold on that margin that
#       scores best (SQuAD v2's F1: an abstention on an unanswerable question scores 1)
# SAVE: save_pretrained files + riverbed-training.json (settings, data, history, threshold),
#       moved into place atomically; cached under a hash of the settings (a second call with the
#       same settings finds it), or written to ``--out``
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actors.embedder import Embedder
from actors.models import TRAINING_RECORD, resolve_text_model, trained_text_model_dir
from actors.reader import ExtractiveReader, calibrate_threshold
from cluster.eval.metrics import best_over, token_f1
from cluster.ray_train import Progress, exclusive, fit_on_ray
from cluster.text_training import ReaderExample, RerankGroup, train_loop
from schemas.errors import ConfigError
from schemas.ids import in_tune_split
from schemas.settings import TRAINED_EMBEDDER, TRAINED_READER, TRAINED_RERANKER, Settings, TextFinetuneConfig

log = logging.getLogger(__name__)

RECORD_FILE = TRAINING_RECORD
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SQUAD_V1 = DATA_DIR / "squad-v1.1-dev"
SQUAD_V2 = DATA_DIR / "squad-v2.0-dev"


@dataclass(frozen=True)
class TextFinetuneResult:
    path: Path
    cached: bool
    record: dict[str, Any]


# DATA
def read_beir(
    dataset: Path, qrels_name: str = "qrels.tsv"
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, dict[str, Any]]]:
    """``(passages by id, the passage id each question is judged against, questions by id)``."""
    for name in ("corpus.jsonl", "queries.jsonl", qrels_name):
        if not (dataset / name).is_file():
            raise ConfigError(
                f"{dataset / name} not found: the dataset needs BEIR layout (corpus, queries, qrels)"
            )
    with (dataset / "corpus.jsonl").open(encoding="utf-8") as f:
        passages = {str(r.get("_id", r.get("id"))): r for r in map(json.loads, filter(str.strip, f))}
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        questions = {str(r.get("_id", r.get("id"))): r for r in map(json.loads, filter(str.strip, f))}
    gold: dict[str, str] = {}
    with (dataset / qrels_name).open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] != "query-id" and parts[0] not in gold:
                gold[parts[0]] = parts[1]
    return passages, gold, questions


def tune_questions(
    questions: dict[str, dict[str, Any]], gold: dict[str, str], held_out_texts: set[str]
) -> list[str]:
    """Ids of the tune-split questions that have a judged passage, minus any whose text is a
    held-out question's (normalised), sorted."""
    return sorted(
        q
        for q in gold
        if q in questions and in_tune_split(q) and _norm(questions[q]["text"]) not in held_out_texts
    )


def held_out_texts(*datasets: dict[str, dict[str, Any]]) -> set[str]:
    return {_norm(r["text"]) for questions in datasets for q, r in questions.items() if not in_tune_split(q)}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def answer_start(context: str, answers: list[str]) -> tuple[int, str]:
    """Where the first of ``answers`` found in ``context`` starts (exact, then ignoring case),
    with its text as the context spells it; ``(-1, "")`` when none is found."""
    for answer in answers:
        at = context.find(answer) if answer.strip() else -1
        if at >= 0:
            return at, answer
    lowered = context.lower()
    for answer in answers:
        at = lowered.find(answer.lower()) if answer.strip() else -1
        if at >= 0:
            return at, context[at : at + len(answer)]
    return -1, ""


_WORD = re.compile(r"\w{3,}")


def distractors(
    question: dict[str, Any],
    gold: str,
    passages: dict[str, dict[str, Any]],
    by_title: dict[str, list[str]],
    n: int,
) -> list[str]:
    """Up to ``n`` ids of other passages of the gold passage's article (same title) that hold none
    of the question's answers (compared ignoring case), those sharing most words (3+ letters,
    ignoring case) with the question first, then by id."""
    if n <= 0:
        return []
    answers = [a.lower() for a in question.get("answers", []) if a.strip()]
    words = set(_WORD.findall(question["text"].lower()))

    def shared(pid: str) -> int:
        return len(words & set(_WORD.findall(passages[pid]["text"].lower())))

    others = [
        pid
        for pid in by_title.get(passages[gold].get("title") or "", [])
        if pid != gold and not any(a in passages[pid]["text"].lower() for a in answers)
    ]
    return sorted(others, key=lambda pid: (-shared(pid), pid))[:n]


def titles(passages: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Passage ids by their title (untitled passages are left out: they have no article)."""
    grouped: dict[str, list[str]] = {}
    for pid, passage in passages.items():
        if passage.get("title"):
            grouped.setdefault(passage["title"], []).append(pid)
    return grouped


def _sample(ids: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))


# THE DRIVERS
def _target(settings: Settings, name: str, out: Path | None, default_data: bool) -> Path:
    if out is not None:
        return out.expanduser().resolve()
    if not default_data:
        raise ConfigError(
            f"{name!r} names the model trained on the packaged SQuAD data: give --out DIR to train on "
            "another dataset (then name the model by that path)"
        )
    return trained_text_model_dir(settings.cache_dir, name, settings.finetune)


def _base(settings: Settings, kind: str) -> str:
    """Where the weights ``finetune.<kind>.base_model`` names are: a hub id or path, or a model
    Riverbed trains, which must be trained first (ConfigError saying how, or how to do without)."""
    name = getattr(settings.finetune, kind).base_model
    try:
        return resolve_text_model(name, settings.finetune, settings.cache_dir).location
    except ConfigError as exc:
        encoder = TextFinetuneConfig.model_fields["base_model"].default
        raise ConfigError(
            f"the {kind} starts from {name!r} (finetune.{kind}.base_model): {exc}; or start it from "
            f"another model: --set finetune.{kind}.base_model={encoder}"
        ) from exc


def finetune_reranker(
    settings: Settings,
    dataset: Path = SQUAD_V1,
    *,
    index: str | None = None,
    out: Path | None = None,
    on_progress: Progress | None = None,
) -> TextFinetuneResult:
    """Trains (or finds in the cache) the cross-encoder (see the module docstring). ``index``: an
    index that already holds ``dataset``'s corpus (else one is built and released)."""
    return _finetune_on_mined(settings, "reranker", dataset, index, out, on_progress)


def finetune_embedder(
    settings: Settings,
    dataset: Path = SQUAD_V1,
    *,
    index: str | None = None,
    out: Path | None = None,
    on_progress: Progress | None = None,
) -> TextFinetuneResult:
    """Trains (or finds in the cache) the fine-tuned embedding model, a sentence-transformers
    directory (see the module docstring); ``index`` as for :func:`finetune_reranker`."""
    return _finetune_on_mined(settings, "embedder", dataset, index, out, on_progress)


def _finetune_on_mined(
    settings: Settings,
    kind: str,
    dataset: Path,
    index: str | None,
    out: Path | None,
    on_progress: Progress | None,
) -> TextFinetuneResult:
    """MINE, TRAIN, SAVE for the models that learn from mined groups (reranker, embedder)."""
    finetune = settings.finetune.reranker if kind == "reranker" else settings.finetune.embedder
    name = TRAINED_RERANKER if kind == "reranker" else TRAINED_EMBEDDER
    target = _target(settings, name, out, dataset.resolve() == SQUAD_V1.resolve())
    with exclusive(target):
        if out is None and (target / RECORD_FILE).is_file():
            return TextFinetuneResult(target, True, json.loads((target / RECORD_FILE).read_text()))
        base = _base(settings, kind)  # before the mining: a base not trained yet fails at once
        passages, gold, questions = read_beir(dataset)
        chosen = _sample(
            tune_questions(questions, gold, held_out_texts(questions)), finetune.questions, finetune.seed
        )
        if not chosen:
            raise ConfigError(f"{dataset} has no tune-split questions with a judged passage")
        groups, mined_s = _mine(
            settings, dataset, index, passages, gold, questions, chosen, finetune.mine_depth
        )
        config = {
            "kind": kind,
            "finetune": finetune.model_dump(mode="json"),
            "base": base,
            "groups": [asdict(g) for g in groups],
        }
        data = {
            "dataset": str(dataset),
            "base": base,  # where the weights it started from were: which reader, for a reranker
            "questions": len(groups),
            "mined_s": round(mined_s, 1),
            "negatives_per_question": round(sum(len(g.negatives) for g in groups) / max(1, len(groups)), 1),
        }
        record = _train(settings, finetune, config, target, data, on_progress)
    return TextFinetuneResult(target, False, record)


def _mine(
    settings: Settings,
    dataset: Path,
    index: str | None,
    passages: dict[str, dict[str, Any]],
    gold: dict[str, str],
    questions: dict[str, dict[str, Any]],
    chosen: list[str],
    depth: int,
) -> tuple[list[RerankGroup], float]:
    """MINE (see the module docstring); returns the groups and the seconds it took."""
    from cluster.eval.retrieval import eval_settings, open_index
    from cluster.pipeline import release_shards
    from deployments.retriever import RayShards
    from deployments.searcher import Searcher

    started = time.monotonic()
    mining = eval_settings(settings, dataset, index)
    search = mining.serve.search.model_copy(update={"rerank": False})
    mining = mining.model_copy(update={"serve": mining.serve.model_copy(update={"search": search})})
    open_index(mining, dataset / "corpus.jsonl" if index is None else None)
    try:
        texts = [questions[q]["text"] for q in chosen]
        vectors = Embedder(mining.embed).embed(texts)
        searcher = Searcher(mining.serve.search, RayShards(mining))
        groups = []
        for lo in range(0, len(chosen), 64):
            batch = slice(lo, lo + 64)
            by_vector, by_keyword = asyncio.run(_both(searcher, texts[batch], vectors[batch], depth))
            for qid, v_hits, k_hits in zip(chosen[batch], by_vector, by_keyword, strict=True):
                group = _group(questions[qid], passages[gold[qid]], gold[qid], v_hits, k_hits)
                if group is not None:
                    groups.append(group)
    finally:
        if index is None:
            release_shards(mining)
    log.info("mined %d groups from %d questions", len(groups), len(chosen))
    return groups, time.monotonic() - started


async def _both(searcher: Any, texts: list[str], vectors: Any, depth: int) -> tuple[Any, Any]:
    return (
        await searcher.search_many(texts, vectors, depth, None, "vector"),
        await searcher.search_many(texts, None, depth, None, "keyword"),
    )


def _group(
    question: dict[str, Any],
    passage: dict[str, Any],
    gold_id: str,
    by_vector: list[Any],
    by_keyword: list[Any],
) -> RerankGroup | None:
    """One question's positive and hard negatives, from its hits of both searches interleaved
    (best ranks first)."""
    answers = [a.lower() for a in question.get("answers", []) if a.strip()]
    positive: tuple[str | None, str] | None = None
    negatives: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    common = min(len(by_vector), len(by_keyword))
    interleaved = [r for pair in zip(by_vector[:common], by_keyword[:common], strict=True) for r in pair]
    interleaved += by_vector[common:] + by_keyword[common:]
    for ranked in interleaved:
        hit = ranked.hit
        if hit.chunk_id in seen:
            continue
        seen.add(hit.chunk_id)
        if hit.document_id == gold_id:
            if positive is None and any(a in hit.text.lower() for a in answers):
                positive = (hit.title, hit.text)
        else:
            negatives.append((hit.title, hit.text))
    if positive is None:
        positive = (passage.get("title"), passage["text"])
    if not negatives:
        return None
    return RerankGroup(question["text"], positive, tuple(negatives))


def finetune_reader(
    settings: Settings,
    dataset: Path = SQUAD_V1,
    unanswerable: Path = SQUAD_V2,
    *,
    out: Path | None = None,
    on_progress: Progress | None = None,
) -> TextFinetuneResult:
    """Trains (or finds in the cache) the extractive reader and sets its abstention threshold
    (see the module docstring). ``unanswerable``: a dataset whose questions include unanswerable
    ones (``is_impossible``), judged against the passage they were written for (``qrels_all.tsv``)."""
    finetune = settings.finetune.reader
    extra = finetune.calibration_passages - 1
    default_data = dataset.resolve() == SQUAD_V1.resolve() and unanswerable.resolve() == SQUAD_V2.resolve()
    target = _target(settings, TRAINED_READER, out, default_data)
    with exclusive(target):
        if out is None and (target / RECORD_FILE).is_file():
            return TextFinetuneResult(target, True, json.loads((target / RECORD_FILE).read_text()))
        base = _base(settings, "reader")
        p1, g1, q1 = read_beir(dataset)
        qrels2 = "qrels_all.tsv" if (unanswerable / "qrels_all.tsv").is_file() else "qrels.tsv"
        p2, g2, q2 = read_beir(unanswerable, qrels2)
        held = held_out_texts(q1, q2)
        # CALIBRATION questions: a seeded fifth of the unanswerable set's tune questions, kept out of
        # training by TEXT in both datasets (SQuAD v2.0 asks v1.1's answerable questions again under
        # other ids: split by id alone, every answerable calibration question was trained on)
        v2_ids = tune_questions(q2, g2, held)
        random.Random(finetune.seed).shuffle(v2_ids)
        calibration_ids = v2_ids[: len(v2_ids) // 5]
        kept_out = {_norm(q2[q]["text"]) for q in calibration_ids}
        v1_ids = [q for q in tune_questions(q1, g1, held) if _norm(q1[q]["text"]) not in kept_out]
        train_ids = _sample(v1_ids, finetune.questions, finetune.seed)
        trained_texts = {_norm(q1[q]["text"]) for q in train_ids}
        v2_train = [
            q for q in v2_ids[len(v2_ids) // 5 :]
            if _norm(q2[q]["text"]) not in kept_out and _norm(q2[q]["text"]) not in trained_texts
        ]  # fmt: skip
        v2_train = _sample(v2_train, finetune.questions, finetune.seed)
        articles1, articles2 = titles(p1), titles(p2)
        calibration = [
            (e, [p2[p]["text"] for p in (g2[q], *distractors(q2[q], g2[q], p2, articles2, extra))])
            for q in calibration_ids
            if (e := _example(q2[q], p2[g2[q]])) is not None
        ]
        examples = [e for e in (_example(q1[q], p1[g1[q]]) for q in train_ids) if e is not None]
        distracting = [
            ReaderExample(q1[q]["text"], p1[d]["text"], -1, "")
            for q in train_ids
            for d in distractors(q1[q], g1[q], p1, articles1, finetune.distractors)
        ]
        examples += distracting
        examples += [e for e in (_example(q2[q], p2[g2[q]]) for q in v2_train) if e is not None]
        if not examples or not calibration:
            raise ConfigError(f"{dataset} / {unanswerable}: no tune-split questions to train or calibrate on")
        config = {
            "kind": "reader",
            "finetune": finetune.model_dump(mode="json"),
            "base": base,
            "examples": [asdict(e) for e in examples],
        }
        data = {
            "dataset": str(dataset),
            "base": base,
            "unanswerable": str(unanswerable),
            "examples": len(examples),
            "unanswerable_examples": sum(e.answer_start < 0 for e in examples),
            "distractor_examples": len(distracting),
            "calibration_questions": len(calibration),
            "calibration_answerable": sum(e.answer_start >= 0 for e, _ in calibration),
            "calibration_passages": sum(len(texts) for _, texts in calibration),
        }

        def calibrate(directory: Path) -> dict[str, Any]:
            reader = ExtractiveReader(
                str(directory), finetune.max_tokens, finetune.stride, finetune.max_answer_tokens
            )
            spans = [reader.read(e.question, texts) for e, texts in calibration]
            scores = [
                (
                    span.margin,
                    best_over(token_f1, span.text, [e.answer_text]) if e.answer_start >= 0 else None,
                )
                for span, (e, _) in zip(spans, calibration, strict=True)
            ]
            return calibrate_threshold(scores)

        record = _train(settings, finetune, config, target, data, on_progress, calibrate)
    return TextFinetuneResult(target, False, record)


def _example(question: dict[str, Any], passage: dict[str, Any]) -> ReaderExample | None:
    """The reading example, or None for an answerable question whose answer is not in the text."""
    context = passage["text"]
    if question.get("is_impossible") or not [a for a in question.get("answers", []) if a.strip()]:
        return ReaderExample(question["text"], context, -1, "")
    start, text = answer_start(context, question["answers"])
    return ReaderExample(question["text"], context, start, text) if start >= 0 else None


def _train(
    settings: Settings,
    finetune: Any,
    config: dict[str, Any],
    target: Path,
    data: dict[str, Any],
    on_progress: Progress | None,
    after: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """TRAIN, then ``after`` on the saved files (its result joins the record), SAVE."""
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)

    def keep(checkpoint: Path) -> Path:
        shutil.copytree(checkpoint, staging)
        return staging

    started = time.monotonic()
    name = f"{config['kind']}-{int(time.time())}"
    _, history = fit_on_ray(
        settings, finetune, train_loop, config, name, on_progress or (lambda e: None), keep
    )
    record = {
        "kind": config["kind"],
        "finetune": finetune.model_dump(mode="json"),
        "data": data,
        "history": history,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    if after is not None:
        record.update(after(staging))
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, target)
    log.info("saved %s (%.0f s of training)", target, record["train_seconds"])
    return record
