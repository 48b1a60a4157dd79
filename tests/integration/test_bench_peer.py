"""`riverbed bench peer` end to end on a 60-passage cut of SQuAD: Riverbed's pipeline and txtai."""

from __future__ import annotations

import json
import math
import time

import pytest
import ray

from cluster.bench.peer import bench_peer
from tests.integration.test_eval import small_dataset

pytestmark = pytest.mark.integration


def test_bench_peer_indexes_and_queries_both_systems_on_the_same_corpus(settings, ray_session, tmp_path):
    small_dataset(tmp_path / "mini")
    out = tmp_path / "out"
    result = bench_peer(settings, tmp_path / "mini", 20, 10, out)

    rb, tx, ratios = result["riverbed"], result["txtai"], result["ratios"]
    assert result["queries"] == 20
    assert rb["documents"] == tx["documents"] == tx["rows"] == 60
    assert rb["chunks"] >= 60
    for side in (rb, tx):
        assert 0.5 < side["recall@10"] <= 1, side
        assert 0 < side["mrr@10"] <= 1
        for key in ("index_s", "index_warm_s", "p50_ms", "p99_ms", "batched_qps"):
            assert side[key] > 0, key
        assert side["index_warm_s"] < side["index_s"]
        assert side["p50_ms"] <= side["p99_ms"]
    for key, ratio in ratios.items():
        assert math.isclose(ratio, rb[key] / tx[key]), key
    local = result["riverbed_in_process_shards"]
    assert math.isclose(result["ratios_in_process_shards"]["p50_ms"], local["p50_ms"] / tx["p50_ms"])
    assert result["versions"]["txtai"]
    assert "peer" in result["summary"] and "recall@10" in result["summary"]

    for name in ("peer.json", "peer.md", "peer.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "peer.json").read_text())["ratios"].keys() == ratios.keys()
    assert "| measure | Riverbed | txtai | ratio |" in (out / "peer.md").read_text()
    # the bench index is throwaway: no shard actor of it is left behind
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _actors_of(result["index"]):
        time.sleep(0.2)
    assert not _actors_of(result["index"])


def _actors_of(index: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(index)]
