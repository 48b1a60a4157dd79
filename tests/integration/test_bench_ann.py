"""`riverbed bench ann` end to end on a cut of the sample corpus: the real chunker and model, a
FAISS shard and a Milvus Lite shard of each structure. No Kafka and no Ray: the benchmark needs
neither."""

from __future__ import annotations

import json

import pytest

from cluster.bench.ann import bench_ann
from schemas.settings import load_settings
from tests.integration.test_eval import small_dataset

pytestmark = pytest.mark.integration


def test_bench_ann_measures_flat_ivf_and_hnsw_of_both_backends_against_exact(tmp_path):
    small_dataset(tmp_path / "mini", n_docs=120)  # ~125 chunks: IVF can train 2 lists
    settings = load_settings(overrides={"home": str(tmp_path / "home"), "cache_dir": str(tmp_path / "cache")})
    out = tmp_path / "out"
    result = bench_ann(settings, tmp_path / "mini", 1, 40, 10, out, backends=["faiss", "milvus"])

    points = result["results"]
    assert result["queries"] == 40 and result["chunks"] >= 120
    assert not result["vectors_cached"]
    nlist = result["ivf_nlist"]
    assert nlist is not None and nlist >= 2
    for backend in ("faiss", "milvus"):
        mine = [p for p in points if p["backend"] == backend]
        for p in mine:
            assert 0.0 <= p["recall"] <= 1.0 and p["single_qps"] > 0 and p["batched_qps"] > 0
        (flat,) = [p for p in mine if p["kind"] == "flat"]
        assert flat["recall"] == 1.0
        ivf = [p for p in mine if p["kind"] == "ivf"]
        assert [p["param"] for p in ivf] == sorted(p["param"] for p in ivf)
        assert ivf[0]["param"] == 1 and ivf[-1]["param"] == nlist and ivf[-1]["recall"] == 1.0
        hnsw = [p for p in mine if p["kind"] == "hnsw"]
        assert [p["param"] for p in hnsw] == [16, 32, 64, 128, 256]
        assert hnsw[-1]["recall"] > 0.95  # efSearch 256 over ~125 vectors is close to exhaustive
    faiss_ivf = [p["recall"] for p in points if p["backend"] == "faiss" and p["kind"] == "ivf"]
    assert faiss_ivf == sorted(faiss_ivf)  # one trained structure: non-decreasing in nprobe

    assert result["summary"].startswith(f"ann on {result['chunks']:,} chunks, 40 queries")
    for name in ("ann.json", "ann.md", "ann.png"):
        assert (out / name).is_file()
    assert json.loads((out / "ann.json").read_text())["results"] == points
    assert (out / "ann.md").read_text().count("\n| ") == 1 + len(points)  # header + one row each

    again = bench_ann(settings, tmp_path / "mini", 1, 40, 10, tmp_path / "out2")
    assert again["vectors_cached"]  # same texts, same model: nothing embedded twice
    assert again["backends"] == ["faiss"]
    assert [p["recall"] for p in again["results"] if p["kind"] == "flat"] == [1.0]


def test_bench_ann_on_synthetic_vectors_needs_no_dataset(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path / "home"), "cache_dir": str(tmp_path / "cache")})
    result = bench_ann(settings, tmp_path / "absent", 1, 30, 10, tmp_path / "out", synthetic=500)
    assert result["chunks"] == 500 and result["queries"] == 30 and result["dim"] == 384
    assert result["ivf_nlist"] == 8  # 500 // 39 = 12 lists at most
    (flat,) = [p for p in result["results"] if p["kind"] == "flat"]
    assert flat["recall"] == 1.0
