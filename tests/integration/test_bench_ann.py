"""`riverbed bench ann` end to end on a cut of the sample corpus: the real chunker and model, the
shard's own FAISS structures. No Kafka and no Ray: the benchmark needs neither."""

from __future__ import annotations

import json

import pytest

from cluster.bench.ann import bench_ann
from schemas.settings import load_settings
from tests.integration.test_eval import small_dataset

pytestmark = pytest.mark.integration


def test_bench_ann_measures_flat_ivf_and_hnsw_against_exact(tmp_path):
    small_dataset(tmp_path / "mini", n_docs=120)  # ~125 chunks: IVF can train 2 lists
    settings = load_settings(overrides={"home": str(tmp_path / "home"), "cache_dir": str(tmp_path / "cache")})
    out = tmp_path / "out"
    result = bench_ann(settings, tmp_path / "mini", 1, 40, 10, out)

    points = result["results"]
    assert result["queries"] == 40 and result["chunks"] >= 120
    assert not result["vectors_cached"]
    for p in points:
        assert 0.0 <= p["recall"] <= 1.0 and p["single_qps"] > 0 and p["batched_qps"] > 0
    (flat,) = [p for p in points if p["kind"] == "flat"]
    assert flat["recall"] == 1.0
    nlist = result["ivf_nlist"]
    assert nlist is not None and nlist >= 2
    ivf = [p for p in points if p["kind"] == "ivf"]
    assert [p["param"] for p in ivf] == sorted(p["param"] for p in ivf)
    assert [p["recall"] for p in ivf] == sorted(p["recall"] for p in ivf)  # non-decreasing in nprobe
    assert ivf[0]["param"] == 1 and ivf[-1]["param"] == nlist and ivf[-1]["recall"] == 1.0
    hnsw = [p for p in points if p["kind"] == "hnsw"]
    assert [p["param"] for p in hnsw] == [16, 32, 64, 128, 256]
    assert hnsw[-1]["recall"] > 0.95  # efSearch 256 over ~125 vectors is close to exhaustive

    assert result["summary"].startswith(f"ann on {result['chunks']:,} chunks, 40 queries")
    for name in ("ann.json", "ann.md", "ann.png"):
        assert (out / name).is_file()
    assert json.loads((out / "ann.json").read_text())["results"] == points
    assert (out / "ann.md").read_text().count("\n| ") == 1 + len(points)  # header + one row each

    again = bench_ann(settings, tmp_path / "mini", 1, 40, 10, tmp_path / "out2")
    assert again["vectors_cached"]  # same texts, same model: nothing embedded twice
    assert [p["recall"] for p in again["results"] if p["kind"] == "flat"] == [1.0]
