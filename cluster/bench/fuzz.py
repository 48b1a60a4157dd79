"""`riverbed bench fuzz`: schemathesis against the running app's OpenAPI schema, every route, as
each kind of client, with the checks that make up the HTTP contract.

# APP: `riverbed serve --no-ingest` on loopback over an index of the bench's own (SQuAD
#   passages, built on the first run and reused) and one generated read+write API key; documents
#   posted go to the bench's topic (the HTTP contract ends there), so the index stays as built
# CLIENTS: ``key`` sends that key as ``Authorization: Bearer``; ``no key`` sends none (or one
#   schemathesis makes up); then the same app with no keys configured (``open``, no key)
# PHASES: schemathesis' own: examples, coverage (boundary values, missing and wrongly typed
#   fields, methods a route does not serve), fuzzing (random valid and invalid requests) and
#   stateful; ``max_examples`` bounds the examples of each route in each phase
# CHECKS: :data:`CHECKS` and :func:`error_shape`: no 5xx; statuses, content types, headers and
#   bodies as the schema declares them; input the schema forbids is refused; a route whose schema
#   asks for a key refuses requests without one; every 4xx and 5xx is ``{"error": {"code",
#   "message", "param"}}``. A request that got no answer (a timeout, a dropped connection) is an
#   error, counted with the failures
# REPORT: per client and route: requests sent, statuses and error codes seen, and each distinct
#   failure (check, message, a curl command that repeats it); ``fuzz.json`` and ``fuzz.md``
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import CheckFailureInfo, ScenarioRecorder

from cluster.bench.query import build_index
from cluster.bench.report import machine, write_table
from cluster.serving import start_serving
from schemas.settings import Settings, load_settings

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
)
"""Schemathesis' checks that state the contract. Left out: ``positive_data_acceptance`` (the
schema cannot state limits that come from the settings, such as ``k`` up to
``serve.search.max_k``, or the tokens per embeddings request, so a request the schema allows
may rightly get a 400 naming the limit); ``use_after_free`` and ``ensure_resource_availability``
(they take a GET that answers 200 after a DELETE, or 404 after a POST, as a failure, but
documents are written through the stream: ``GET /v1/documents/{id}`` reports any id's indexing
status, 200 with ``indexed: false`` before the pipeline wrote it and after it was deleted); and
``object_level_authorization`` (keys here carry scopes, not owners)."""
REFUSALS = ("400", "401", "403", "404", "405", "413", "415", "5xx")
"""What ``negative_data_rejection`` takes as a refusal of input the schema forbids: schemathesis'
list, less statuses this app never answers, plus 413 (a body over ``serve.max_body_bytes``, such
as a batch of more documents than allowed). A 5xx is ``not_a_server_error``'s failure."""
REQUEST_TIMEOUT_S = 120.0
"""A request unanswered after this long is an error (RAG generates on CPU)."""
INDEX = "bench-fuzz"


@schemathesis.check
def error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """Every 4xx and 5xx answers ``{"error": {"code": str, "message": str, "param": str | null}}``."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    shaped = (
        isinstance(error, dict)
        and isinstance(error.get("code"), str)
        and isinstance(error.get("message"), str)
        and "param" in error
        and (error["param"] is None or isinstance(error["param"], str))
    )
    if not shaped:
        raise AssertionError(f"{response.status_code} is not in the error shape: {response.text[:300]!r}")


@dataclass
class RouteTally:
    """What one client saw on one route (``POST /v1/search``)."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    """Error codes (``error.code``) of the 4xx and 5xx answers."""
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each distinct failure (``check: title``): its message, a curl command and how many times."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Phases that did not run on this route, with schemathesis' reason."""

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "codes": dict(sorted(self.codes.items())),
            "failures": list(self.failures.values()),
            "skipped": self.skipped,
        }


@dataclass
class FuzzRun:
    """One client's run over every route of the schema."""

    client: str
    routes: dict[str, RouteTally] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    """Requests that got no answer and what schemathesis could not do, each as one line."""
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.routes.values())

    @property
    def failures(self) -> int:
        """Distinct failures on every route, plus the errors."""
        return sum(len(r.failures) for r in self.routes.values()) + len(self.errors)

    def route(self, label: str) -> RouteTally:
        return self.routes.setdefault(label, RouteTally())

    def to_json(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "failures": self.failures,
            "errors": self.errors,
            "routes": {label: t.to_json() for label, t in sorted(self.routes.items())},
        }


def fuzz_config(bearer: str | None, max_examples: int, seed: int) -> schemathesis.Config:
    """Schemathesis' settings for one run: :data:`CHECKS` and :func:`error_shape` only, the key (if
    any) as the schema's bearer credential, no example database (runs start afresh)."""
    checks: dict[str, Any] = {"enabled": False, **{name: {"enabled": True} for name in CHECKS}}
    checks["negative_data_rejection"]["expected-statuses"] = list(REFUSALS)
    checks[error_shape.__name__] = {"enabled": True}
    config: dict[str, Any] = {
        "seed": seed,
        "request-timeout": REQUEST_TIMEOUT_S,
        "continue-on-failure": True,
        "generation": {"max-examples": max_examples, "database": "none"},
        "checks": checks,
    }
    if bearer is not None:
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": bearer}}}
    return schemathesis.Config.from_dict(config)


def fuzz(url: str, client: str, bearer: str | None, max_examples: int, seed: int = 0) -> FuzzRun:
    """Runs schemathesis against the app at ``url`` (its schema at ``/openapi.json``) as ``client``
    (a name for the report), sending ``bearer`` as the key, or no key when None."""
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=fuzz_config(bearer, max_examples, seed), timeout=REQUEST_TIMEOUT_S
    )
    run = FuzzRun(client)
    start = time.perf_counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _tally(run, event)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.title}: {_first_line(str(event.info))}")
        elif isinstance(event, events.FatalError):
            raise RuntimeError(f"schemathesis stopped: {event.exception!r}") from event.exception
    run.seconds = time.perf_counter() - start
    return run


def _tally(run: FuzzRun, event: events.ScenarioFinished) -> None:
    """Adds one scenario's requests, answers and failed checks to ``run``, by route."""
    recorder = event.recorder
    if event.status == Status.SKIP and event.label:
        run.route(event.label).skipped[event.phase.value] = event.skip_reason or "skipped"
    for case_id, interaction in recorder.interactions.items():
        tally = run.route(_label(recorder, case_id))
        tally.requests += 1
        if interaction.response is None:
            continue  # no answer: the engine reports it as an error
        tally.statuses[interaction.response.status_code] += 1
        if interaction.response.status_code >= 400:
            tally.codes[_error_code(interaction.response)] += 1
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status == Status.FAILURE and check.failure_info is not None:
                _add_failure(
                    run.route(_label(recorder, case_id)), recorder, case_id, check.name, check.failure_info
                )


def _label(recorder: ScenarioRecorder, case_id: str) -> str:
    """The route a case was sent to (a stateful scenario sends to several)."""
    node = recorder.cases.get(case_id)
    return node.value.operation.label if node is not None else recorder.label


def _add_failure(
    tally: RouteTally, recorder: ScenarioRecorder, case_id: str, check: str, info: CheckFailureInfo
) -> None:
    """Counts a failed check; the first request that failed it stands for all (message, curl)."""
    answered = recorder.interactions.get(case_id)
    status = answered.response.status_code if answered is not None and answered.response else None
    entry = {"check": check, "title": info.failure.title, "status": status, "message": info.failure.message,
             "curl": info.code_sample, "count": 0}  # fmt: skip
    tally.failures.setdefault(f"{check}: {info.failure.title}", entry)["count"] += 1


def _error_code(response: schemathesis.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "(not JSON)"
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else "(no error.code)"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


# RUN
def fuzz_settings(base: Settings, key: str | None) -> Settings:
    """``base`` with the bench's own index and topics (it never touches the user's index), served
    on loopback, with ``key`` as its only API key (both scopes), or no keys when None."""
    dump = base.model_dump(mode="json")
    topics = {
        name: f"bench.{INDEX}.{name.replace('_', '-')}" for name in ("documents", "images", "dead_letter")
    }
    dump["index"] = {**dump["index"], "name": INDEX}
    dump["kafka"]["topics"] = {**dump["kafka"]["topics"], **topics}
    keys = [] if key is None else [{"key": key, "scopes": ["read", "write"], "name": INDEX}]
    dump["serve"] = {**dump["serve"], "host": "127.0.0.1", "auth": {**dump["serve"]["auth"], "keys": keys}}
    return load_settings(overrides=dump)


def _serve_and_fuzz(
    settings: Settings, clients: dict[str, str | None], max_examples: int, seed: int
) -> list[FuzzRun]:
    serving = start_serving(settings, ingest=False)
    try:
        runs = []
        for client, bearer in clients.items():
            _say(f"fuzz: {client}, up to {max_examples} examples per route and phase")
            runs.append(fuzz(serving.url, client, bearer, max_examples, seed))
            _say(f"fuzz: {client}: {runs[-1].requests} requests, {runs[-1].failures} failures")
        return runs
    finally:
        serving.stop()


def bench_fuzz(base: Settings, dataset: Path, max_examples: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """Runs what this module's docstring describes; writes ``fuzz.json`` and ``fuzz.md`` under
    ``out_dir`` and returns the JSON's content."""
    key = secrets.token_urlsafe(32)
    settings = fuzz_settings(base, key)
    stats = build_index(settings, dataset / "corpus.jsonl", 1)
    runs = _serve_and_fuzz(settings, {"key": key, "no key": None}, max_examples, seed)
    runs += _serve_and_fuzz(fuzz_settings(base, None), {"open": None}, max_examples, seed)
    failures = sum(r.failures for r in runs)
    result: dict[str, Any] = {
        "command": f"riverbed bench fuzz --examples {max_examples} --seed {seed}",
        "machine": machine(),
        "schemathesis": schemathesis.__version__,
        "index": settings.index.name,
        "documents": stats["documents"],
        "max_examples": max_examples,
        "seed": seed,
        "checks": [*CHECKS, error_shape.__name__],
        "runs": [r.to_json() for r in runs],
        "failures": failures,
    }
    counts = ", ".join(f"{r.client} {r.requests} requests" for r in runs)
    result["summary"] = f"fuzz: {counts}; {failures} failures (report in {out_dir}/fuzz.md)"
    write_fuzz_report(out_dir, result)
    return result


def write_fuzz_report(out_dir: Path, result: dict[str, Any]) -> Path:
    """``fuzz.json`` and ``fuzz.md``: a row per client and route, then each failure in full."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fuzz.json").write_text(json.dumps(result, indent=2, default=str))
    rows, details = [], []
    for run in result["runs"]:
        for label, route in run["routes"].items():
            rows.append([run["client"], label, str(route["requests"]), _counts(route["statuses"]),
                         _counts(route["codes"]), str(len(route["failures"]))])  # fmt: skip
            details += [_failure(run["client"], label, f) for f in route["failures"]]
        details += [f"- **{run['client']}**: {error}" for error in run["errors"]]
    preamble = (
        f"`{result['command']}`: schemathesis {result['schemathesis']}, up to {result['max_examples']} "
        f"examples per route and phase, checks {', '.join(result['checks'])}; {result['failures']} failures."
    )
    headers = ["client", "route", "requests", "statuses", "error codes", "failures"]
    md = write_table(out_dir, "fuzz", headers, rows, preamble)
    if details:
        with md.open("a") as f:
            f.write("\nFailures:\n\n" + "\n".join(details) + "\n")
    return md


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items()) or "-"


def _failure(client: str, label: str, failure: dict[str, Any]) -> str:
    curl = "\n".join(f"  {line}" for line in failure["curl"].splitlines())
    head = f"- **{client}, {label}**, {failure['check']} ({failure['count']} times): {failure['message']}"
    return f"{head}\n\n  ```\n{curl}\n  ```"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
