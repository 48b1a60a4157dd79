"""`bench ann`'s pure parts: recall, the sweep's settings, the vector cache, the table writer; and the
sweep itself on random vectors (the benchmark's own run on real embeddings is an integration test)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.testing import HashEmbedder
from actors.vector_index import ChunkRecord
from cluster.bench.ann import (
    bench_ann,
    ef_searches_for,
    embed_cached,
    fit_nlist,
    nprobes_for,
    recall_at_k,
    sweep,
)
from cluster.bench.report import parse_backends, write_table
from schemas.errors import ConfigError
from schemas.ids import chunk_id
from schemas.settings import FaissConfig, IndexConfig, MilvusConfig, load_settings


def test_recall_counts_shared_ids_per_row_over_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[3, 2, 1], [6, 5, 4]]), exact, 3) == 1.0  # order does not matter
    assert recall_at_k(np.array([[1, 9, 8], [4, 5, 7]]), exact, 3) == pytest.approx(3 / 6)
    assert recall_at_k(np.array([[1, -1, -1], [-1, -1, -1]]), exact, 3) == pytest.approx(1 / 6)
    assert recall_at_k(np.array([[1, 2, 9], [4, 9, 9]]), exact, 1) == 1.0  # only the first k columns


def test_recall_refuses_mismatched_rows_and_empty_input():
    with pytest.raises(ValueError, match="rows"):
        recall_at_k(np.zeros((2, 3)), np.zeros((3, 3)), 3)
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((0, 3)), np.zeros((0, 3)), 3)


def test_fit_nlist_keeps_the_configured_one_when_trainable_else_a_smaller_power_of_two():
    assert fit_nlist(256 * 39, 256) == 256
    assert fit_nlist(100_000, 256) == 256
    assert fit_nlist(2251, 256) == 32  # 2251 // 39 = 57 lists at most
    assert fit_nlist(78, 256) == 2
    assert fit_nlist(39, 256) == 1
    assert fit_nlist(38, 256) is None
    assert fit_nlist(2251, 50) == 50


def test_sweep_settings_are_capped_sorted_and_include_the_configured_one():
    assert nprobes_for(32, 16) == [1, 4, 16, 32]
    assert nprobes_for(256, 24) == [1, 4, 16, 24, 64]
    assert nprobes_for(2, 16) == [1, 2]
    assert ef_searches_for(10, 64) == [16, 32, 64, 128, 256]
    assert ef_searches_for(50, 100) == [50, 64, 100, 128, 256]


def test_embed_cached_embeds_once_then_loads(tmp_path, monkeypatch):
    embedder = HashEmbedder(dim=16)
    texts = ["the first text", "a second one"]
    first, cached = embed_cached(embedder, texts, tmp_path, "chunks")
    assert not cached and first.shape == (2, 16) and first.dtype == np.float32

    def refuse(texts: object) -> np.ndarray:
        raise AssertionError("embedded again despite the cache")

    monkeypatch.setattr(embedder, "embed", refuse)
    again, cached = embed_cached(embedder, texts, tmp_path, "chunks")
    assert cached and np.array_equal(first, again)
    with pytest.raises(AssertionError):  # other texts are another key
        embed_cached(embedder, [*texts, "a third"], tmp_path, "chunks")
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_sweep_on_random_vectors_measures_every_kind_through_the_shard(backend, capsys):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    records = [
        ChunkRecord(chunk_id(f"d{i}", 0), f"d{i}", 0, f"text {i}", None, 0, 6, {}, v)
        for i, v in enumerate(vectors)
    ]
    index = IndexConfig(faiss=FaissConfig(ivf_nlist=256, hnsw_m=8), milvus=MilvusConfig(hnsw_m=8))
    points, chosen = sweep(index, [backend], records, vectors, queries, k=10, threads=1, model="test/m")

    assert chosen["ivf_nlist"] == 8  # 400 // 39 = 10 lists at most
    assert {p.backend for p in points} == {backend}
    flat = [p for p in points if p.kind == "flat"]
    assert len(flat) == 1 and flat[0].recall == 1.0
    ivf = [p for p in points if p.kind == "ivf"]
    assert [p.param for p in ivf] == [1, 4, 8]
    assert ivf[-1].recall == 1.0  # every list probed: exhaustive
    assert ivf[0].recall < 1.0  # one list of 8 misses neighbours: the setting reached the search
    hnsw = [p for p in points if p.kind == "hnsw"]
    assert [p.param for p in hnsw] == [16, 32, 64, 128, 256]
    assert hnsw[-1].recall > 0.95
    for p in points:
        assert 0 <= p.recall <= 1 and p.single_qps > 0 and p.batched_qps > 0 and p.p50_ms <= p.p99_ms
    assert "written and snapshotted" in capsys.readouterr().err


def test_backends_are_parsed_in_order_and_checked():
    assert parse_backends("faiss,milvus") == ["faiss", "milvus"]
    assert parse_backends(" milvus ") == ["milvus"]
    for bad in ("", "faiss,faiss", "faiss,elastic"):
        with pytest.raises(ConfigError, match="--backend"):
            parse_backends(bad)


def test_repeat_other_than_one_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--repeat"):
        bench_ann(load_settings(), tmp_path / "missing", 3, 10, 10, tmp_path / "out")


def test_write_table_writes_preamble_header_and_rows(tmp_path):
    path = write_table(tmp_path / "out", "t", ["a", "b"], [["1", "x|y"]], preamble="# Title")
    assert path.read_text() == "# Title\n\n| a | b |\n|---|---|\n| 1 | x\\|y |\n"
    with pytest.raises(ValueError, match="row 0"):
        write_table(tmp_path, "t", ["a", "b"], [["1"]])
