"""Reranking: the searcher's reordering of its top candidates, and the cross-encoder wrapper on a
real (untrained-head) MiniLM cross-encoder saved the way `riverbed finetune reranker` saves one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from actors.index_shard import IndexShard
from actors.models import resolve_model
from actors.reranker import Reranker, pair_text
from actors.testing import HashEmbedder
from actors.vector_index import ChunkRecord
from deployments.searcher import LocalShards, Searcher
from schemas.errors import ConfigError
from schemas.ids import chunk_id
from schemas.settings import TRAINED_RERANKER, FaissConfig, IndexConfig, SearchConfig
from tests.contract.helpers import scratch_dir

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class WordScorer:
    """Scores a passage by how often ``word`` occurs in it: an order the fused ranking does not
    give, so a reordering is visible. Records what it was asked."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.calls: list[tuple[list[str], list[list[tuple[str | None, str]]]]] = []

    def score_many(
        self, queries: Sequence[str], passages: Sequence[Sequence[tuple[str | None, str]]]
    ) -> list[np.ndarray]:
        self.calls.append((list(queries), [list(p) for p in passages]))
        return [
            np.array([text.count(self.word) for _, text in group], dtype=np.float32) for group in passages
        ]


# Every text holds "river" or "bank" (keyword search finds them all), "river" a different number of
# times than the BM25 order would put them.
TEXTS = [
    "The river bank was steep and the bank was muddy.",
    "A bank lends money; this bank is by the river.",
    "River, river, river: the river flows past the bank.",
    "The bank of the river river is green.",
    "Banks and a bank: river trade.",
    "Bank holidays close every bank in town.",
]


@pytest.fixture
def shards() -> Iterator[list[IndexShard]]:
    embedder = HashEmbedder(dim=32)
    with scratch_dir() as d:
        shard = IndexShard(
            IndexConfig(n_shards=1, faiss=FaissConfig(omp_threads=1)), d, 0, embedder.model_name, 32
        )
        shard.warm_up()
        for i, text in enumerate(TEXTS):
            doc = f"d{i}"
            shard.index.upsert(
                [
                    ChunkRecord(
                        chunk_id(doc, 0), doc, 0, text, None, 0, len(text), {}, embedder.embed([text])[0]
                    )
                ]
            )
        yield [shard]
        shard.close()


def test_the_top_candidates_are_reordered_by_the_reranker_and_the_rest_keep_their_order(shards):
    config = SearchConfig(
        rerank=True, rerank_candidates=3, candidates=10, rerank_weight=1e6
    )  # the model's order
    scorer = WordScorer("river")
    searcher = Searcher(config, LocalShards(shards), reranker=scorer)
    plain = Searcher(config.model_copy(update={"rerank": False}), LocalShards(shards))
    before = asyncio.run(plain.search("river bank", None, 6, None, "keyword"))
    after = asyncio.run(searcher.search("river bank", None, 6, None, "keyword"))
    assert len(scorer.calls) == 1 and scorer.calls[0][0] == ["river bank"]
    assert [t for _, t in scorer.calls[0][1][0]] == [r.hit.text for r in before[:3]]
    head = sorted(before[:3], key=lambda r: -r.hit.text.count("river"))  # stable, as the searcher sorts
    assert [r.hit.chunk_id for r in head] != [r.hit.chunk_id for r in before[:3]], "the texts reorder"
    assert [r.hit.chunk_id for r in after[:3]] == [r.hit.chunk_id for r in head]
    assert [r.hit.chunk_id for r in after[3:]] == [r.hit.chunk_id for r in before[3:6]]
    assert [r.rerank_score for r in after[:3]] == [float(r.hit.text.count("river")) for r in head]
    assert all(r.rerank_score is None for r in after[3:])
    assert after[0].keyword_rank is not None  # the fusion's explanation is kept


def test_the_reranker_rank_is_fused_with_the_retrieval_rank(shards):
    config = SearchConfig(rerank=True, rerank_candidates=4, rerank_weight=1.5, rerank_rrf_k=2)
    plain = asyncio.run(
        Searcher(SearchConfig(), LocalShards(shards)).search("river bank", None, 4, None, "keyword")
    )
    fused = asyncio.run(
        Searcher(config, LocalShards(shards), reranker=WordScorer("river")).search(
            "river bank", None, 4, None, "keyword"
        )
    )
    counts = [r.hit.text.count("river") for r in plain]
    by_model = sorted(range(4), key=lambda i: -counts[i])
    value = {plain[i].hit.chunk_id: 1.5 / (2 + by_model.index(i) + 1) + 1 / (2 + i + 1) for i in range(4)}
    assert [r.hit.chunk_id for r in fused] == sorted(value, key=lambda c: -value[c])
    assert [r.score for r in fused] == pytest.approx(sorted(value.values(), reverse=True))


def test_no_reranking_without_the_setting_or_for_images_or_when_asked_not_to(shards):
    scorer = WordScorer("river")
    off = Searcher(SearchConfig(rerank=False), LocalShards(shards), reranker=scorer)
    images = Searcher(SearchConfig(rerank=True), LocalShards(shards), modality="image", reranker=scorer)
    on = Searcher(SearchConfig(rerank=True), LocalShards(shards), reranker=scorer)
    asyncio.run(off.search("river", None, 3, None, "keyword"))
    asyncio.run(images.search("river", None, 3, None, "keyword"))
    asyncio.run(on.search_many(["river"], None, 3, None, "keyword", rerank=False))
    assert scorer.calls == []


def test_k_above_the_candidates_returns_k_hits(shards):
    scorer = WordScorer("river")
    searcher = Searcher(SearchConfig(rerank=True, rerank_candidates=2), LocalShards(shards), reranker=scorer)
    hits = asyncio.run(searcher.search("river bank water", None, 5, None, "keyword"))
    assert len(scorer.calls[0][1][0]) == 2
    assert len(hits) == min(5, len(asyncio.run(Searcher(SearchConfig(), LocalShards(shards)).search(
        "river bank water", None, 5, None, "keyword"))))  # fmt: skip


def test_pair_text_reads_title_then_text():
    assert pair_text("Normans", "They came.") == "Normans: They came."
    assert pair_text(None, "They came.") == "They came."


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with a new one-logit head, saved as `riverbed finetune reranker` saves its model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    location = resolve_model(MINILM).location
    target = tmp_path_factory.mktemp("ce")
    AutoModelForSequenceClassification.from_pretrained(location, num_labels=1).save_pretrained(target)
    AutoTokenizer.from_pretrained(location).save_pretrained(target)
    return target


def test_a_saved_cross_encoder_scores_pairs_as_its_own_model_does(cross_encoder, tmp_path):
    from sentence_transformers import CrossEncoder

    config = SearchConfig(rerank=True, rerank_model=str(cross_encoder), rerank_max_tokens=64)
    reranker = Reranker(config, tmp_path, num_cpus=1)
    passages = [("Normans", "The Normans were a people."), (None, "Rivers flow to the sea."), (None, "")]
    got = reranker.score_many(["who were the normans", "rivers"], [passages, passages[:1]])
    assert [g.shape for g in got] == [(3,), (1,)]
    direct = CrossEncoder(str(cross_encoder), max_length=64).predict(
        [("who were the normans", pair_text(t, x)) for t, x in passages]
    )
    np.testing.assert_allclose(got[0], direct, rtol=1e-4, atol=1e-5)
    assert reranker.score_many(["q"], [[]])[0].shape == (0,)


def test_a_model_with_more_than_one_label_is_refused(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    location = resolve_model(MINILM).location
    AutoModelForSequenceClassification.from_pretrained(location, num_labels=3).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(location).save_pretrained(tmp_path / "m")
    reranker = Reranker(SearchConfig(rerank_model=str(tmp_path / "m")), tmp_path)
    with pytest.raises(ConfigError, match="3 labels"):
        reranker.warm_up()


def test_the_trained_reranker_not_yet_trained_names_the_command(tmp_path):
    with pytest.raises(ConfigError, match="riverbed finetune reranker"):
        Reranker(SearchConfig(rerank_model=TRAINED_RERANKER), tmp_path)


def test_bench_rerank_times_one_query_of_candidates_at_a_time(cross_encoder, tmp_path):
    from cluster.bench.rerank import bench_rerank
    from schemas.settings import load_settings

    settings = load_settings(
        overrides={
            "cache_dir": str(tmp_path),
            "serve": {
                "search": {
                    "rerank_model": str(cross_encoder),
                    "rerank_candidates": 4,
                    "rerank_max_tokens": 64,
                }
            },
        }
    )
    result = bench_rerank(settings, tmp_path / "out", queries=3)
    assert result["queries"] == 3 and result["candidates"] == 4
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["pairs_per_s"] > 0
    assert (tmp_path / "out" / "rerank.md").is_file()
