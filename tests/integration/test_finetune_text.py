"""Tiny training runs of the reranker, the embedder (LoRA) and the reader on Ray Train (the
session's Ray and broker): negatives mined by Riverbed's own search of a real index, models saved
where their users load them, the reader's abstention threshold calibrated; then `eval retrieval`
reranks with the model and `eval rag` answers with the reader."""

from __future__ import annotations

import json

from actors.reader import make_reader
from actors.reranker import Reranker
from cluster.eval.rag import eval_rag
from cluster.eval.retrieval import eval_retrieval
from cluster.finetune_text import finetune_embedder, finetune_reader, finetune_reranker
from schemas.settings import load_settings
from tests.integration.test_eval import small_dataset

TINY = {"questions": 12, "batch_size": 4, "epochs": 3, "lr": 3e-4, "warmup_fraction": 0.0}


def test_tiny_reranker_learns_its_groups_and_reranks_the_evaluation(settings, ray_session, tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from actors.models import resolve_model

    small_dataset(tmp_path / "v1cut", 30)
    # the reranker starts from the reader by default: a question-answering checkpoint (here MiniLM
    # with an untrained span head), whose span head it drops for its own one-logit head
    minilm = resolve_model("sentence-transformers/all-MiniLM-L6-v2").location
    AutoModelForQuestionAnswering.from_pretrained(minilm).save_pretrained(tmp_path / "qa")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(tmp_path / "qa")
    dump = settings.model_dump(mode="json")
    dump["finetune"] = {
        "reranker": {
            **TINY,
            "max_tokens": 96,
            "negatives": 2,
            "mine_depth": 5,
            "base_model": str(tmp_path / "qa"),
        }
    }
    tiny = load_settings(overrides=dump)
    events: list[dict] = []
    result = finetune_reranker(tiny, tmp_path / "v1cut", out=tmp_path / "rr", on_progress=events.append)
    record = json.loads((tmp_path / "rr" / "riverbed-training.json").read_text())
    assert not result.cached and record == result.record and record["kind"] == "reranker"
    assert record["finetune"]["base_model"] == str(tmp_path / "qa")
    assert record["data"]["questions"] == 12 and record["data"]["negatives_per_question"] >= 2
    losses = [epoch["loss"] for epoch in record["history"]]
    assert len(losses) == 3 == len([e for e in events if e["kind"] == "epoch"])
    assert losses[-1] < losses[0], f"the loss did not fall over 3 epochs: {losses}"

    search = tiny.serve.search.model_copy(update={"rerank": True, "rerank_model": str(result.path)})
    reranker = Reranker(search, tiny.cache_dir)
    assert reranker.score("who", [(None, "a"), ("T", "b")]).shape == (2,)

    dump["serve"] = {**dump["serve"], "search": search.model_dump(mode="json")}
    report = eval_retrieval(
        load_settings(overrides=dump), tmp_path / "v1cut", split="all", sample=10, modes=("hybrid",),
        out_dir=tmp_path / "out",
    )  # fmt: skip
    assert report["rerank"]["location"] == str(result.path) and report["rerank"]["candidates"] == 20
    assert 0 < report["modes"]["hybrid"]["recall@20"] <= 1
    assert (tmp_path / "out" / "retrieval-v1cut-all-rerank.json").is_file()


def test_tiny_lora_embedder_trains_its_adapters_and_saves_a_plain_model(settings, ray_session, tmp_path):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from actors.models import resolve_model

    small_dataset(tmp_path / "v1cut", 30)
    dump = settings.model_dump(mode="json")
    lora = {**TINY, "lr": 1e-3, "max_tokens": 96, "mine_depth": 5, "lora_rank": 4, "lora_alpha": 8}
    dump["finetune"] = {"embedder": lora}
    tiny = load_settings(overrides=dump)
    result = finetune_embedder(tiny, tmp_path / "v1cut", out=tmp_path / "emb")
    record = result.record
    assert record["kind"] == "embedder" and record["finetune"]["lora_rank"] == 4
    losses = [epoch["loss"] for epoch in record["history"]]
    assert losses[-1] < losses[0], f"the loss did not fall over 3 epochs: {losses}"
    # merged: a plain sentence-transformers model (no adapter files), whose vectors moved
    assert not list((tmp_path / "emb").rglob("adapter_config.json"))
    texts = ["Who led the Normans?", "The Normans were led by Rollo."]
    trained = SentenceTransformer(str(tmp_path / "emb"), device="cpu").encode(texts)
    base_model = resolve_model(tiny.finetune.embedder.base_model).location
    base = SentenceTransformer(base_model, device="cpu").encode(texts)
    assert trained.shape == base.shape and not np.allclose(trained, base, atol=1e-4)


def test_tiny_reader_is_calibrated_and_answers_rag_with_spans_or_abstains(settings, ray_session, tmp_path):
    small_dataset(tmp_path / "v1", 30)
    small_dataset(tmp_path / "v2", 30, "squad-v2.0-dev", "qrels_all.tsv")
    dump = settings.model_dump(mode="json")
    dump["finetune"] = {"reader": {**TINY, "max_tokens": 128, "stride": 32}}
    tiny = load_settings(overrides=dump)
    result = finetune_reader(tiny, tmp_path / "v1", tmp_path / "v2", out=tmp_path / "reader")
    record = result.record
    assert record["kind"] == "reader" and record["data"]["unanswerable_examples"] > 0
    assert record["data"]["examples"] > record["data"]["unanswerable_examples"]
    assert record["data"]["calibration_questions"] > record["data"]["calibration_answerable"] > 0
    assert 0 <= record["calibration_f1"] <= 1 and isinstance(record["threshold"], float)
    _, threshold = make_reader(
        tiny.serve.llm.model_copy(update={"backend": "extractive", "reader_model": str(result.path)}),
        tiny.finetune,
        tiny.cache_dir,
    )
    assert threshold == record["threshold"]

    dump["serve"] = {**dump["serve"], "llm": {"backend": "extractive", "reader_model": str(result.path)},
                     "rag": {"k": 2}}  # fmt: skip
    report = eval_rag(
        load_settings(overrides=dump), tmp_path / "v2", split="all", sample=8, out_dir=tmp_path / "o"
    )
    assert report["generator"] == str(result.path) and len(report["records"]) == 8
    for r in report["records"]:
        assert r["abstained"] == (r["reason"] is not None)
        if not r["abstained"]:
            assert r["citations"] and r["answer"]  # a span of a cited passage
