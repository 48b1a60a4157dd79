"""``riverbed bench query``'s report: a saved result redraws to the same table, and the plot is
written (one panel for latency, one for throughput)."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.bench.query import report


def _levels(qps: list[float]) -> list[dict]:
    return [
        {"clients": c, "requests": 100, "errors": 0, "p50_ms": 10.0 * c, "p99_ms": 12.0 * c, "qps": q}
        for c, q in zip((1, 4, 16, 64), qps, strict=True)
    ]


def test_a_saved_result_redraws_its_table_and_plot(tmp_path: Path):
    modes = {
        m: {
            "in_process": {"p50_ms": 5.0, "p99_ms": 9.0, "single_qps": 200.0, "batched_qps": batched},
            "http": _levels(qps),
            "overhead_p50_ms_1_client": 5.0,
            "throughput_ratio_16_vs_in_process_batched": qps[2] / batched,
        }
        for m, batched, qps in (("vector", 160.0, [40, 70, 80, 81]), ("keyword", 40.0, [30, 40, 44, 45]))
    }
    result = {"chunks": 123, "queries": 100, "k": 10, "edge": "haproxy", "modes": modes}
    report(tmp_path / "a", result)
    saved = json.loads((tmp_path / "a" / "query.json").read_text())
    report(tmp_path / "b", saved)
    table = (tmp_path / "a" / "query.md").read_text()
    assert table == (tmp_path / "b" / "query.md").read_text()
    assert "| vector: HTTP 16 clients / in-process batched | 0.50x |" in table
    assert "| keyword: HTTP 16 clients / in-process batched | 1.10x |" in table
    assert (tmp_path / "b" / "query.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
