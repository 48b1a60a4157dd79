"""`riverbed bench batching` end to end on ~200 texts of the SQuAD mix, with the real model.

Asserts what must hold whatever the machine: every text embedded once by every strategy, the
same vectors (min cosine), less padding with the token budget, the three files written. Speed
ratios go to the report, never into assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench import batching
from schemas.settings import Settings
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def test_bench_batching_small(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # One pass, a short warm-up and a two-point sweep keep the test short; the logic is the same.
    monkeypatch.setattr(batching, "ROUNDS", 1)
    monkeypatch.setattr(batching, "WARM_UP_TEXTS", 32)
    monkeypatch.setattr(batching, "SWEEP", {"cpu": (1024,), "cuda": (8192,)})
    out = tmp_path / "bench"

    result = batching.bench_batching(settings, REPO / "data" / "squad-v1.1-dev", 200, out)

    n = result["texts"]
    assert n == 200
    assert result["passages"] > 0 and result["questions"] > 0
    assert result["passages"] + result["questions"] == n
    tokens = result["tokens"]
    assert batching.MIN_TOKENS <= tokens["min"] <= tokens["p50"] <= tokens["p90"] <= tokens["max"]
    assert tokens["max"] <= result["max_tokens"] <= batching.MAX_TOKENS

    strategies = result["strategies"]
    runs = [*strategies.values(), *result["sweep"]]
    for run in runs:
        assert run["rows"] == n and run["each_text_once"] and run["all_finite"]
        assert run["texts_per_s"] > 0
    for run in [strategies["token_budget"], strategies["fixed32_arrival"], *result["sweep"]]:
        assert run["min_cosine_to_reference"] >= 0.999
    assert {row["max_batch_tokens"] for row in result["sweep"]} == {1024, result["batch_limits"][0]}
    assert (
        strategies["token_budget"]["padding_efficiency"]
        >= strategies["fixed32_arrival"]["padding_efficiency"]
    )

    assert json.loads((out / "batching.json").read_text())["texts"] == n
    table = (out / "batching.md").read_text()
    assert "| fixed 32, arrival order" in table and "| 1024 |" in table
    assert (out / "batching.png").stat().st_size > 0
    assert result["summary"].startswith("batching: token budget")
