"""What `riverbed bench load` counted, and its report: ``load.json``, ``load.md`` and ``load.png``.

Every request is a :class:`Sample`. Per route it is 2xx (``ok``), shed (429 or 503: refusals the
app is designed to give under load) or an error (any other status, or no answer at all); latency
percentiles are over the 2xx answers only, so a fast refusal never flatters them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.bench.query import percentile
from cluster.bench.report import write_plot, write_table

SHED = frozenset({429, 503})
BULK_P99_LIMIT = 2.0
"""Search p99 while bulk embeddings run, at most this many times its p99 without them."""


@dataclass(frozen=True)
class Sample:
    """One request: its route (a name the bench gives it), HTTP status (0: no answer), when it was
    sent (``time.perf_counter``) and how long its answer took, in seconds; ``code`` says why a
    non-2xx failed (the error shape's code, else ``HTTP <status>`` or the exception's class)."""

    route: str
    status: int
    sent_s: float
    seconds: float
    code: str | None = None


@dataclass(frozen=True)
class Phase:
    """One stretch of load: its ``clients``, every request's :class:`Sample`, and how long it ran
    from its first request to its last answer (s)."""

    clients: int
    samples: list[Sample]
    elapsed_s: float


def outcome(status: int) -> Literal["ok", "shed", "error"]:
    """2xx: ok; 429 and 503: shed; anything else, 0 (no answer) included: an error."""
    if 200 <= status < 300:
        return "ok"
    return "shed" if status in SHED else "error"


def _ms(seconds: list[float], q: float) -> float | None:
    return round(percentile(seconds, q) * 1000, 1) if seconds else None


def route_stats(samples: Iterable[Sample]) -> dict[str, dict[str, Any]]:
    """Per route, by name: ``requests``, ``ok``, ``shed``, ``errors``, ``statuses`` (status ->
    count), ``codes`` (why non-2xx failed -> count), and ``p50_ms`` / ``p99_ms`` over its 2xx
    answers (None without any)."""
    by_route: dict[str, list[Sample]] = {}
    for s in samples:
        by_route.setdefault(s.route, []).append(s)
    stats = {}
    for route, group in sorted(by_route.items()):
        outcomes = Counter(outcome(s.status) for s in group)
        served = [s.seconds for s in group if outcome(s.status) == "ok"]
        stats[route] = {
            "requests": len(group),
            "ok": outcomes["ok"],
            "shed": outcomes["shed"],
            "errors": outcomes["error"],
            "statuses": dict(sorted(Counter(str(s.status) for s in group).items())),
            "codes": dict(Counter(s.code for s in group if s.code is not None)),
            "p50_ms": _ms(served, 50),
            "p99_ms": _ms(served, 99),
        }
    return stats


def totals(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``requests``, ``ok``, ``shed`` and ``errors`` summed over routes, and ``error_rate``: errors
    per request (0.0 without requests)."""
    out: dict[str, Any] = {
        k: sum(int(r[k]) for r in stats.values()) for k in ("requests", "ok", "shed", "errors")
    }
    out["error_rate"] = out["errors"] / out["requests"] if out["requests"] else 0.0
    return out


def phase_report(phase: Phase) -> dict[str, Any]:
    """A phase's ``clients``, ``seconds``, :func:`totals`, ``ok_per_s`` and ``routes``."""
    stats = route_stats(phase.samples)
    total = totals(stats)
    rate = round(total["ok"] / phase.elapsed_s, 1) if phase.elapsed_s > 0 else 0.0
    return {"clients": phase.clients, "seconds": round(phase.elapsed_s, 2), **total, "ok_per_s": rate,
            "routes": stats}  # fmt: skip


def _figure(report: Mapping[str, Any], route: str, key: str) -> Any:
    return report["routes"].get(route, {}).get(key)


def summarize(levels: Sequence[Phase], alone: Phase, with_bulk: Phase, bulk_inputs: int) -> dict[str, Any]:
    """The levels' reports, and ``bulk``: the reports of search alone (``alone``) and with bulk
    embeddings requests (``with_bulk``, route ``bulk embeddings``), their search p99s and
    ``p99_ratio`` (with / alone; None when either has no 2xx search) against ``p99_limit``.
    ``requests``, ``shed``, ``errors`` and ``error_rate`` cover every phase."""
    reports = [phase_report(p) for p in levels]
    solo, busy = phase_report(alone), phase_report(with_bulk)
    p99_solo, p99_busy = _figure(solo, "search", "p99_ms"), _figure(busy, "search", "p99_ms")
    every = [*reports, solo, busy]
    requests, errors = sum(r["requests"] for r in every), sum(r["errors"] for r in every)
    bulk = {
        "clients": alone.clients,
        "inputs": bulk_inputs,
        "search_p99_alone_ms": p99_solo,
        "search_p99_with_bulk_ms": p99_busy,
        "p99_ratio": round(p99_busy / p99_solo, 2) if p99_solo and p99_busy is not None else None,
        "p99_limit": BULK_P99_LIMIT,
        "bulk_requests": _figure(busy, "bulk embeddings", "requests") or 0,
        "bulk_p50_ms": _figure(busy, "bulk embeddings", "p50_ms"),
        "alone": solo,
        "with_bulk": busy,
    }
    return {"levels": reports, "bulk": bulk, "requests": requests, "shed": sum(r["shed"] for r in every),
            "errors": errors, "error_rate": errors / requests if requests else 0.0}  # fmt: skip


def verdicts(result: Mapping[str, Any]) -> dict[str, bool]:
    """Each target, met or not: ``no_errors``; ``search_p99_with_bulk`` within its limit; and
    ``index_unchanged``: as many chunks after the load as before."""
    ratio = result["bulk"]["p99_ratio"]
    return {
        "no_errors": result["errors"] == 0,
        "search_p99_with_bulk": ratio is not None and ratio <= result["bulk"]["p99_limit"],
        "index_unchanged": result["chunks_before"] == result["chunks_after"],
    }


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def causes(result: Mapping[str, Any]) -> dict[str, int]:
    """Why requests were not 2xx, over every phase: ``"<route>: <code>"`` -> count."""
    counted: Counter[str] = Counter()
    for report in [*result["levels"], result["bulk"]["alone"], result["bulk"]["with_bulk"]]:
        for route, stats in report["routes"].items():
            counted.update({f"{route}: {code}": n for code, n in stats["codes"].items()})
    return dict(counted)


def findings(result: Mapping[str, Any]) -> list[str]:
    """The run's three targets, one sentence each, with their verdicts (and what failed)."""
    bulk, met = result["bulk"], verdicts(result)
    why = ", ".join(f"{cause} x{n}" for cause, n in causes(result).items())
    return [
        f"non-2xx other than 429/503: {result['errors']} of {result['requests']} requests "
        f"(target 0: {_met(met['no_errors'])}); shed (429/503): {result['shed']}"
        + (f"; not 2xx: {why}" if why else ""),
        f"search p99 at {bulk['clients']} clients: {_cell(bulk['search_p99_alone_ms'])} ms alone, "
        f"{_cell(bulk['search_p99_with_bulk_ms'])} ms while {bulk['inputs']}-input embeddings requests "
        f"run ({bulk['bulk_requests']} of them, p50 {_cell(bulk['bulk_p50_ms'])} ms): {bulk['p99_ratio']}x "
        f"(target at most {bulk['p99_limit']:g}x: {_met(met['search_p99_with_bulk'])})",
        f"index chunks before / after the load: {result['chunks_before']} / {result['chunks_after']} "
        f"(target equal: {_met(met['index_unchanged'])})",
    ]


def _rows(label: str, report: Mapping[str, Any]) -> list[list[str]]:
    """A phase's rows: one per route, then its total with its 2xx answers per second."""

    def counts(r: Mapping[str, Any]) -> list[str]:
        return [str(r[k]) for k in ("requests", "ok", "shed", "errors")]

    rows = [
        [label, route, *counts(r), _cell(r["p50_ms"]), _cell(r["p99_ms"]), ""]
        for route, r in report["routes"].items()
    ]
    return [*rows, [label, "all", *counts(report), "", "", f"{report['ok_per_s']:.1f}"]]


def write_load_report(out_dir: Path, result: Mapping[str, Any]) -> None:
    """``load.json`` (``result``), ``load.md`` (command, machine, :func:`findings`, then a row per
    phase and route) and ``load.png`` (per route p99, and search p50, against clients; the
    levels' 2xx answers per second)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load.json").write_text(json.dumps(result, indent=2, default=str))
    host, bulk = result["machine"], result["bulk"]
    preamble = "\n".join([
        f"`{result['command']}` on {host['cores']} cores ({host['cpu']}; load average before the run "
        f"{host['load_average_before']}); index {result['index']}: {result['documents']} documents.",
        "",
        *(f"- {line}" for line in findings(result)),
    ])  # fmt: skip
    rows = [row for lv in result["levels"] for row in _rows(f"mix, {lv['clients']} client(s)", lv)]
    rows += _rows(f"search alone, {bulk['clients']} clients", bulk["alone"])
    rows += _rows(f"search + bulk, {bulk['clients']} clients", bulk["with_bulk"])
    headers = ["load", "route", "requests", "2xx", "429/503", "errors", "p50 ms", "p99 ms", "2xx/s"]
    write_table(out_dir, "load", headers, rows, preamble)
    write_load_plot(out_dir, result["levels"])


def write_load_plot(out_dir: Path, levels: Sequence[Mapping[str, Any]]) -> None:
    lines = [(route, "p99_ms") for route in sorted({r for lv in levels for r in lv["routes"]})]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for route, key in [("search", "p50_ms"), *lines]:
        points = [(lv["clients"], _figure(lv, route, key)) for lv in levels]
        kept = [(c, v) for c, v in points if v is not None]
        series[f"{route} {key.removesuffix('_ms')}"] = ([c for c, _ in kept], [v for _, v in kept])
    write_plot(
        out_dir,
        "load",
        title="mixed load with API keys: latency per route",
        series=series,
        right_series={"2xx answers/s": ([lv["clients"] for lv in levels], [lv["ok_per_s"] for lv in levels])},
        xlabel="concurrent clients",
        ylabel="latency (ms)",
        ylog=True,
    )
