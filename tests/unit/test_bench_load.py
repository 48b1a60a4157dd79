"""`bench load`'s pure parts: how requests are counted (outcomes, percentiles, error rate, the bulk
ratio), the mix's cycle, the budget's stop conditions, the workload, the bench's settings and its
report files. The run against the live app is tests/integration/test_bench_load.py."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest

from cluster.bench.load import (
    INDEX,
    MIX,
    TURN_REQUESTS,
    Budget,
    Workload,
    load_bench_settings,
    mix_cycle,
)
from cluster.bench.load_report import (
    Phase,
    Sample,
    causes,
    findings,
    outcome,
    route_stats,
    summarize,
    totals,
    verdicts,
    write_load_report,
)
from cluster.cli import main
from schemas.errors import ConfigError
from schemas.settings import load_settings


def sample(route: str, status: int, seconds: float, code: str | None = None) -> Sample:
    return Sample(route, status, 0.0, seconds, code)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ACCOUNTING
@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "ok"), (202, "ok"), (429, "shed"), (503, "shed"), (400, "error"), (401, "error"),
     (403, "error"), (404, "error"), (500, "error"), (502, "error"), (0, "error")],
)  # fmt: skip
def test_only_2xx_is_ok_and_only_429_and_503_are_shed(status, expected):
    assert outcome(status) == expected


def test_route_stats_count_each_outcome_and_take_percentiles_over_2xx_only():
    served = [0.01 * i for i in range(1, 101)]
    samples = [sample("search", 200, s) for s in served]
    samples += [sample("search", 503, 9.0, "index_unavailable"), sample("search", 0, 120.0, "ReadTimeout")]
    samples += [sample("search", 401, 0.0001, "unauthorized")]
    samples += [sample("rag", 401, 0.002, "unauthorized"), sample("rag", 401, 0.003, "unauthorized")]
    stats = route_stats(samples)
    search = stats["search"]
    assert search["requests"] == 103 and search["ok"] == 100 and search["shed"] == 1 and search["errors"] == 2
    assert search["statuses"] == {"0": 1, "200": 100, "401": 1, "503": 1}
    assert search["codes"] == {"index_unavailable": 1, "ReadTimeout": 1, "unauthorized": 1}
    assert search["p50_ms"] == pytest.approx(float(np.percentile(served, 50)) * 1000, abs=0.05)
    assert search["p99_ms"] == pytest.approx(float(np.percentile(served, 99)) * 1000, abs=0.05)
    # a route without a 2xx answer has no latency figures (not those of its refusals)
    assert stats["rag"]["p50_ms"] is None and stats["rag"]["p99_ms"] is None
    assert stats["rag"]["errors"] == 2


def test_totals_sum_routes_and_rate_errors_per_request():
    stats = route_stats(
        [sample("search", 200, 0.1)] * 6 + [sample("rag", 429, 0.1), sample("rag", 500, 0.1)]
        + [sample("documents post", 0, 1.0, "ConnectError")] * 2
    )  # fmt: skip
    t = totals(stats)
    assert (t["requests"], t["ok"], t["shed"], t["errors"]) == (10, 6, 1, 3)
    assert t["error_rate"] == pytest.approx(0.3)
    assert totals({})["error_rate"] == 0.0


def phase(clients: int, samples: list[Sample], elapsed: float = 2.0) -> Phase:
    return Phase(clients, samples, elapsed)


def test_summary_compares_search_p99_with_and_without_bulk_and_counts_every_phase():
    alone = phase(4, [sample("search", 200, 0.1)] * 99 + [sample("search", 200, 0.2)])
    busy = phase(4, [sample("search", 200, 0.1)] * 90 + [sample("search", 200, 0.35)] * 10
                 + [sample("bulk embeddings", 200, 8.0)])  # fmt: skip
    level = phase(1, [sample("search", 200, 0.05), sample("rag", 500, 0.5, "internal_error")], elapsed=4.0)
    result = summarize([level], alone, busy, bulk_inputs=2048)
    bulk = result["bulk"]
    p99_alone = float(np.percentile([0.1] * 99 + [0.2], 99)) * 1000
    assert bulk["search_p99_alone_ms"] == pytest.approx(p99_alone, abs=0.05)
    assert bulk["search_p99_with_bulk_ms"] == pytest.approx(350.0)
    assert bulk["p99_ratio"] == pytest.approx(round(350.0 / bulk["search_p99_alone_ms"], 2))
    assert bulk["bulk_requests"] == 1 and bulk["bulk_p50_ms"] == pytest.approx(8000.0)
    assert bulk["inputs"] == 2048 and bulk["clients"] == 4
    assert result["requests"] == 2 + 100 + 101 and result["errors"] == 1
    assert result["error_rate"] == pytest.approx(1 / 203)
    assert result["levels"][0]["ok_per_s"] == pytest.approx(0.2)  # 1 answer in 4 s, rounded
    assert result["levels"][0]["clients"] == 1
    result.update(chunks_before=5, chunks_after=5)
    assert causes(result) == {"rag: internal_error": 1}
    assert (
        "1 of 203 requests (target 0: NOT met); shed (429/503): 0; not 2xx: rag: internal_error x1"
        in (findings(result)[0])
    )


def test_no_search_answer_leaves_the_ratio_undecided_and_the_target_unmet():
    refused = phase(4, [sample("search", 503, 0.001)])
    result = summarize([], refused, phase(4, [sample("search", 200, 0.1)]), bulk_inputs=2048)
    assert result["bulk"]["p99_ratio"] is None
    result.update(chunks_before=10, chunks_after=10)
    assert verdicts(result) == {"no_errors": True, "search_p99_with_bulk": False, "index_unchanged": True}


@pytest.mark.parametrize(
    ("p99_with_bulk", "errors", "after", "expected"),
    [
        (0.2, 0, 10, (True, True, True)),
        (0.21, 0, 10, (True, False, True)),
        (0.1, 1, 11, (False, True, False)),
    ],
)
def test_verdicts_hold_each_target(p99_with_bulk, errors, after, expected):
    level = phase(1, [sample("search", 200, 0.1)] + [sample("rag", 404, 0.1, "not_found")] * errors)
    alone = phase(4, [sample("search", 200, 0.1)])
    busy = phase(4, [sample("search", 200, p99_with_bulk)])
    result = summarize([level], alone, busy, bulk_inputs=2048) | {"chunks_before": 10, "chunks_after": after}
    met = verdicts(result)
    assert (met["no_errors"], met["search_p99_with_bulk"], met["index_unchanged"]) == expected


# MIX
def test_the_cycle_holds_each_kind_by_its_weight_spread_out():
    cycle = mix_cycle(MIX)
    assert Counter(cycle) == Counter(MIX) and len(cycle) == sum(MIX.values())
    assert cycle[0] == "search"  # the heaviest first
    for kind in ("rag", "embeddings", "documents"):  # the lighter kinds never come twice in a row
        assert all(not (a == b == kind) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True))
    # the heaviest kind is everywhere: at most one other turn between two searches
    gaps = [i for i, kind in enumerate(cycle) if kind == "search"]
    assert max(b - a for a, b in pairwise(gaps)) <= 2
    assert mix_cycle(MIX) == cycle  # deterministic


def test_a_cycle_needs_positive_weights():
    with pytest.raises(ValueError, match="at least 1"):
        mix_cycle({"search": 2, "rag": 0})
    with pytest.raises(ValueError):
        mix_cycle({})


# STOP CONDITIONS
def drain(budget: Budget) -> list[str]:
    turns = []
    while (kind := budget.next()) is not None:
        turns.append(kind)
    return turns


def test_the_budget_stops_before_a_turn_would_exceed_the_request_count():
    budget = Budget(["search", "documents"], requests=5, seconds=60, clock=FakeClock())
    turns = drain(budget)
    assert turns == ["search", "documents", "search"]  # 1 + 2 + 1; the next documents turn would make 6
    assert budget.sent == sum(TURN_REQUESTS[k] for k in turns) == 4
    budget = Budget(["search", "documents"], requests=6, seconds=60, clock=FakeClock())
    assert drain(budget) == ["search", "documents", "search", "documents"] and budget.sent == 6


def test_the_budget_stops_at_its_deadline_and_stays_stopped():
    clock = FakeClock()
    budget = Budget(mix_cycle(MIX), requests=10_000, seconds=2.0, clock=clock)
    assert [budget.next() for _ in range(3)] == mix_cycle(MIX)[:3]
    clock.now += 1.999
    assert budget.next() is not None
    clock.now += 0.001
    assert budget.next() is None
    clock.now -= 10  # once closed, always closed
    assert budget.next() is None and budget.closed


def test_close_stops_the_budget_and_turns_go_round_the_cycle():
    budget = Budget(["search", "rag"], requests=100, seconds=60, clock=FakeClock())
    assert [budget.next() for _ in range(5)] == ["search", "rag", "search", "rag", "search"]
    budget.close()
    assert budget.next() is None and budget.turns == 5


@pytest.mark.parametrize(("requests", "seconds"), [(0, 10.0), (10, 0.0), (10, -1.0)])
def test_a_budget_without_requests_or_time_is_refused(requests, seconds):
    with pytest.raises(ConfigError, match="requests >= 1 and seconds > 0"):
        Budget(["search"], requests=requests, seconds=seconds)


# WORKLOAD AND SETTINGS
def test_the_workload_takes_texts_in_turn_and_names_each_document_once():
    work = Workload(["a", "b", "c"], ["x"], "vector", 10, run="r1")
    assert work.texts(1) == ["a"] and work.texts(4) == ["b", "c", "a", "b"] and work.texts(1) == ["c"]
    ids = [work.document_id() for _ in range(50)]
    assert len(set(ids)) == 50 and all(i.startswith(f"{INDEX}/r1/") for i in ids)


def test_bench_settings_use_their_own_index_and_topics_and_one_key_with_both_scopes(tmp_path):
    base = load_settings(overrides={"home": str(tmp_path)})
    key = "k" * 40
    settings = load_bench_settings(base, key)
    assert settings.index.name == INDEX and settings.data_dir == tmp_path / "data" / INDEX
    topics = settings.kafka.topics
    assert {topics.documents, topics.images, topics.dead_letter}.isdisjoint(
        {base.kafka.topics.documents, base.kafka.topics.images, base.kafka.topics.dead_letter}
    )
    [only] = settings.serve.auth.keys
    assert only.key.get_secret_value() == key and only.scopes == ["read", "write"]
    assert settings.serve.auth.enabled and key not in settings.model_dump_json()
    assert base.serve.auth.keys == [] and base.index.name != INDEX  # the base is left as it was


def test_cli_bench_load_refuses_a_run_without_time_before_starting_anything(capsys, tmp_path):
    assert main(["bench", "load", "--seconds", "0", "--home", str(tmp_path)]) == 2
    assert "--seconds and --requests must be positive" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


# REPORT
def test_the_report_writes_json_markdown_and_plot(tmp_path):
    levels = [phase(c, [sample("search", 200, 0.01 * c), sample("documents post", 202, 0.02),
                        sample("documents delete", 202, 0.02)]) for c in (1, 4)]  # fmt: skip
    alone = phase(4, [sample("search", 200, 0.1)])
    busy = phase(4, [sample("search", 200, 0.15), sample("bulk embeddings", 200, 9.0)])
    result = {
        "command": "riverbed bench load --seconds 2",
        "machine": {"cores": 2, "cpu": "x86_64", "load_average_before": [1.0, 1.0, 1.0]},
        "index": INDEX,
        "documents": 2067,
        "chunks_before": 2251,
        "chunks_after": 2251,
        **summarize(levels, alone, busy, bulk_inputs=2048),
    }
    write_load_report(tmp_path, result)
    assert json.loads((tmp_path / "load.json").read_text())["bulk"]["p99_ratio"] == pytest.approx(1.5)
    md = (tmp_path / "load.md").read_text()
    assert "riverbed bench load --seconds 2" in md
    assert "0 of 9 requests (target 0: met)" in md
    assert "1.5x (target at most 2x: met)" in md and "2251 / 2251 (target equal: met)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * 4 + 2 + 3  # header; per level 3 routes + all; alone 1 + all; busy 2 + all
    assert (tmp_path / "load.png").stat().st_size > 0
