"""``riverbed bench query``'s report: a saved result redraws to the same table, and the plot is
written (one panel for latency, one for throughput)."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.bench.query import _http_level, report


def _levels(qps: list[float]) -> list[dict]:
    return [
        {"clients": c, "requests": 100, "errors": 0, "p50_ms": 10.0 * c, "p99_ms": 12.0 * c, "qps": q}
        for c, q in zip((1, 4, 16, 64), qps, strict=True)
    ]


def test_a_level_sends_every_query_once_and_counts_what_failed():
    """Against a real HTTP server (aiohttp's) that fails the queries holding "bad": every query is
    sent once over the clients' connections (after 4 warm-up requests), with the key; each non-200
    answer is an error; the client's CPU a request is measured."""
    import asyncio

    from aiohttp import web

    seen: list[str] = []

    async def search(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer the-key"
        body = await request.json()
        assert (body["k"], body["mode"]) == (7, "hybrid")
        seen.append(body["query"])
        return web.json_response({"hits": []}, status=500 if "bad" in body["query"] else 200)

    async def run() -> dict:
        app = web.Application()
        app.router.add_post("/v1/search", search)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await _http_level(f"http://127.0.0.1:{port}", queries, 7, "hybrid", 4, "the-key")
        finally:
            await runner.cleanup()

    queries = [f"q{i}" for i in range(40)] + ["bad one", "bad two", "bad three"]
    level = asyncio.run(run())
    assert sorted(seen[4:]) == sorted(queries)  # after the warm-up, each query once
    assert (level["clients"], level["requests"], level["errors"]) == (4, len(queries), 3)
    assert level["qps"] > 0 and level["client_cpu_ms"] > 0


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
    modes["vector"]["http"][2]["client_cpu_ms"] = 0.31
    result = {"chunks": 123, "queries": 100, "k": 10, "edge": "haproxy", "modes": modes}
    report(tmp_path / "a", result)
    saved = json.loads((tmp_path / "a" / "query.json").read_text())
    report(tmp_path / "b", saved)
    table = (tmp_path / "a" / "query.md").read_text()
    assert table == (tmp_path / "b" / "query.md").read_text()
    assert "| vector: HTTP 16 clients / in-process batched | 0.50x |" in table
    assert "| keyword: HTTP 16 clients / in-process batched | 1.10x |" in table
    assert (
        "| vector: HTTP 16 clients p50 / p99 | 160.0 / 192.0 ms, 80 q/s, 0 errors, "
        "client CPU 0.31 ms a request |" in table
    )
    assert (tmp_path / "b" / "query.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
