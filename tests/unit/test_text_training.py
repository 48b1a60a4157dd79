"""The pure parts of training the reranker and the reader: schedule, batches, groups, span labels,
and the driver's data handling (tune split only, answers located in their passages)."""

from __future__ import annotations

import random

import pytest

from actors.models import resolve_model
from cluster.finetune_text import (
    SQUAD_V1,
    SQUAD_V2,
    answer_start,
    distractors,
    held_out_texts,
    read_beir,
    titles,
    tune_questions,
)
from cluster.text_training import (
    ReaderExample,
    RerankGroup,
    epoch_batches,
    group_pairs,
    lr_factor,
    pad_batch,
    reader_features,
)
from schemas.errors import ConfigError
from schemas.ids import in_tune_split


def test_lr_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4) == 1.0 and lr_factor(7, 10, 4) == 0.5 and lr_factor(10, 10, 4) == 0.0
    assert lr_factor(0, 10, 0) == 1.0


def test_epoch_batches_cover_every_item_once_and_workers_get_equal_shares():
    one = epoch_batches(10, 3, random.Random(0))
    assert sorted(i for b in one for i in b) == list(range(10)) and [len(b) for b in one].count(3) == 3
    parts = [epoch_batches(10, 3, random.Random(0), rank, 2) for rank in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    seen = [i for part in parts for b in part for i in b]
    assert len(seen) == len(set(seen))


def test_group_pairs_put_the_positive_first_and_draw_distinct_negatives():
    groups = [
        RerankGroup("q0", ("T", "gold"), (("A", "n1"), ("B", "n2"), (None, "n3"))),
        RerankGroup("q1", (None, "gold1"), ((None, "only"),)),
    ]
    pairs, size = group_pairs(groups, [0, 1], 2, random.Random(1))
    assert size == 3 and len(pairs) == 6
    assert pairs[0] == ("q0", "T: gold") and pairs[3] == ("q1", "gold1")
    assert len({p for _, p in pairs[1:3]}) == 2 and {p for _, p in pairs[1:3]} <= {"A: n1", "B: n2", "n3"}
    assert pairs[4:] == [("q1", "only"), ("q1", "only")]  # too few mined: drawn again


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2").location)


def test_reader_labels_point_at_the_answer_tokens_or_at_the_first_token(tokenizer):
    context = " ".join(f"word{i}" for i in range(60)) + " The capital is Warsaw today. " + "tail " * 40
    at = context.index("Warsaw")
    examples = [
        ReaderExample("What is the capital?", context, at, "Warsaw"),
        ReaderExample("Who won?", context, -1, ""),
    ]
    features = reader_features(tokenizer, examples, max_tokens=64, stride=16)
    assert len(features["input_ids"]) > 4  # long passages read in several windows
    holding = []
    for w, source in enumerate(features["example"]):
        s, e = features["start_positions"][w], features["end_positions"][w]
        offsets = features["offset_mapping"][w]
        if source == 1:
            assert (s, e) == (0, 0)
        elif (s, e) != (0, 0):
            holding.append(w)
            assert context[offsets[s][0] : offsets[e][1]] == "Warsaw"
        else:  # a window without all of the answer
            inside = [o for o in offsets if o is not None]
            assert not (inside[0][0] <= at and inside[-1][1] >= at + len("Warsaw"))
    assert holding, "some window holds the answer"
    batch = pad_batch(features, [0, 1], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["start_positions"].tolist() == [
        features["start_positions"][0],
        features["start_positions"][1],
    ]


def test_answer_start_finds_the_first_answer_in_the_text_exactly_then_ignoring_case():
    assert answer_start("In 1066 the Normans came.", ["the normans", "1066"]) == (3, "1066")
    assert answer_start("The Normans came.", ["the normans"]) == (0, "The Normans")
    assert answer_start("Nothing here.", ["absent", " "]) == (-1, "")


def test_distractors_are_the_articles_most_question_like_passages_without_the_answer():
    passages = {
        "a0": {"title": "Normandy", "text": "The Normans settled Normandy in 911."},
        "a1": {"title": "Normandy", "text": "Normandy's dukes fought; the Normans raided the coast."},
        "a2": {"title": "Normandy", "text": "Rollo signed a treaty in 911 with the Franks."},
        "a3": {"title": "Normandy", "text": "Cider and cheese come from the region."},
        "b0": {"title": "Paris", "text": "The Normans besieged Paris many times."},
        "c0": {"text": "An untitled passage about the Normans."},
    }
    by_title = titles(passages)
    assert by_title == {"Normandy": ["a0", "a1", "a2", "a3"], "Paris": ["b0"]}
    question = {"text": "When did the Normans settle Normandy?", "answers": ["911", "in 911"]}
    # a2 holds the answer (not a distractor); a1 shares "normans" and "normandy"; b0 is another article
    assert distractors(question, "a0", passages, by_title, 2) == ["a1", "a3"]
    assert distractors(question, "a0", passages, by_title, 0) == []
    assert distractors({"text": "Who besieged Paris?", "answers": []}, "b0", passages, by_title, 3) == []
    assert distractors({"text": "Who?", "answers": ["x"]}, "c0", passages, by_title, 3) == []


def test_training_questions_are_tune_split_only_and_never_a_held_out_question_asked_again():
    _, gold1, q1 = read_beir(SQUAD_V1)
    _, gold2, q2 = read_beir(SQUAD_V2, "qrels_all.tsv")
    held = held_out_texts(q1, q2)
    v1 = tune_questions(q1, gold1, held)
    v2 = tune_questions(q2, gold2, held)
    assert v1 and v2 and all(in_tune_split(q) for q in v1 + v2)
    assert not {" ".join(q2[q]["text"].lower().split()) for q in v2} & held
    # SQuAD v2.0 asks v1.1's questions again under new ids: some tune ids carry a held-out text
    assert len(v2) < len([q for q in gold2 if q in q2 and in_tune_split(q)])


def test_the_lora_fields_join_the_embedders_cache_key_only_when_lora_is_on(tmp_path):
    from actors.models import trained_text_model_dir
    from schemas.settings import (
        TRAINED_EMBEDDER,
        TRAINED_READER,
        TRAINED_RERANKER,
        EmbedderFinetuneConfig,
        FinetuneConfig,
        RerankerFinetuneConfig,
    )

    full = EmbedderFinetuneConfig()
    assert "lora_rank" not in full.key_fields() and "workers" not in full.key_fields()
    lora = EmbedderFinetuneConfig(lora_rank=8)
    assert lora.key_fields()["lora_rank"] == 8 and lora.key_fields()["lora_alpha"] == 32
    where = {
        c: trained_text_model_dir(tmp_path, TRAINED_EMBEDDER, FinetuneConfig(embedder=c))
        for c in (full, lora, EmbedderFinetuneConfig(lora_alpha=64), EmbedderFinetuneConfig(workers=4))
    }
    # alpha alone (LoRA off) and resources name the same model as the defaults; LoRA another
    assert len(set(where.values())) == 2 and where[full] != where[lora]
    # the defaults' keys, as the models trained before the LoRA fields were cached: a change here
    # loses every trained model, so it must be a deliberate one (a recipe bump)
    assert where[full].name == "embedder-squad-f0b0220c3bb79023"
    assert trained_text_model_dir(tmp_path, TRAINED_READER, FinetuneConfig()).name == (
        "reader-squad-43b89ae073b94ca0"
    )
    # the reranker started from the packaged MiniLM keeps the key it was cached under; from the
    # reader (the default since) it is another model
    minilm = RerankerFinetuneConfig(base_model="sentence-transformers/all-MiniLM-L6-v2")
    reranker = trained_text_model_dir(tmp_path, TRAINED_RERANKER, FinetuneConfig(reranker=minilm))
    assert reranker.name == "reranker-squad-95b7f5ac9b60cf47"
    assert trained_text_model_dir(tmp_path, TRAINED_RERANKER, FinetuneConfig()).name == (
        "reranker-squad-2550dd7556a53777"
    )


def test_a_model_started_from_a_trained_one_is_keyed_by_it_and_needs_it_trained(tmp_path):
    from actors.models import resolve_text_model, trained_text_model_dir
    from cluster.finetune_text import _base
    from schemas.settings import TRAINED_READER, TRAINED_RERANKER, FinetuneConfig, load_settings

    default = FinetuneConfig()
    assert default.reranker.base_model == TRAINED_READER
    other_reader = FinetuneConfig(reader={"epochs": 3})
    # another reader (settings of the reader alone) names another reranker
    assert trained_text_model_dir(tmp_path, TRAINED_RERANKER, default) != trained_text_model_dir(
        tmp_path, TRAINED_RERANKER, other_reader
    )
    settings = load_settings(overrides={"home": str(tmp_path / "home"), "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(
        ConfigError, match=r"the reranker starts from 'riverbed/reader-squad'.*riverbed finetune reader"
    ):
        _base(settings, "reranker")
    reader_dir = trained_text_model_dir(settings.cache_dir, TRAINED_READER, settings.finetune)
    reader_dir.mkdir(parents=True)
    (reader_dir / "config.json").write_text("{}")
    assert _base(settings, "reranker") == str(reader_dir)
    assert resolve_text_model(TRAINED_READER, settings.finetune, settings.cache_dir).location == str(
        reader_dir
    )
    # a hub id or a path is resolved as any model name is
    assert _base(settings, "reader") == resolve_model("sentence-transformers/all-MiniLM-L6-v2").location
    # the served reranker not trained yet: the error says what to train, in order, and points at
    # a reranker trained from MiniLM (the default before) when the cache holds one
    from schemas.settings import RerankerFinetuneConfig

    with pytest.raises(ConfigError, match=r"run `riverbed finetune reranker`$"):
        resolve_text_model(TRAINED_RERANKER, settings.finetune, settings.cache_dir)
    reader_dir.joinpath("config.json").unlink()
    with pytest.raises(ConfigError, match=r"not trained either: `riverbed finetune reader` first\)$"):
        resolve_text_model(TRAINED_RERANKER, settings.finetune, settings.cache_dir)
    minilm = FinetuneConfig(
        reranker=RerankerFinetuneConfig(base_model="sentence-transformers/all-MiniLM-L6-v2")
    )
    older = trained_text_model_dir(settings.cache_dir, TRAINED_RERANKER, minilm)
    older.mkdir(parents=True)
    (older / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"base_model=sentence-transformers/all-MiniLM-L6-v2 uses it$"):
        resolve_text_model(TRAINED_RERANKER, settings.finetune, settings.cache_dir)
    assert resolve_text_model(TRAINED_RERANKER, minilm, settings.cache_dir).location == str(older)
    # models that start from each other have no key: refused, naming the chain
    cycle = FinetuneConfig(reader={"base_model": TRAINED_RERANKER})
    with pytest.raises(
        ConfigError,
        match=r"each other \(riverbed/reranker-squad -> riverbed/reader-squad -> riverbed/reranker-squad\)",
    ):
        trained_text_model_dir(tmp_path, TRAINED_RERANKER, cycle)
    itself = FinetuneConfig(reader={"base_model": TRAINED_READER})
    with pytest.raises(ConfigError, match="start from each other"):
        trained_text_model_dir(tmp_path, TRAINED_READER, itself)
