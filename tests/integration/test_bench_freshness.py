"""`riverbed bench freshness` on a short, slow load: real broker, real pipeline, real model."""

from __future__ import annotations

import json

import pytest

from cluster.bench.freshness import bench_freshness, documents
from schemas.errors import ConfigError


def test_every_produced_document_becomes_searchable_and_is_timed(settings, ray_session, tmp_path):
    result = bench_freshness(settings, rate=4.0, seconds=5.0, out_dir=tmp_path)
    assert result["documents"] == 20
    assert result["searchable"] == 20 and result["missing"] == 0
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert 3.0 <= result["rate_achieved"] <= 5.0  # the producer kept to its schedule
    assert sum(w["documents"] for w in result["windows"]) == 20
    assert json.loads((tmp_path / "freshness.json").read_text())["p50_ms"] == result["p50_ms"]
    assert (tmp_path / "freshness.md").is_file() and (tmp_path / "freshness.png").is_file()


def test_documents_get_fresh_ids_and_copies_when_the_run_needs_more():
    docs = documents(2070, "run")
    assert len({d.id for d in docs}) == 2070
    assert docs[0].id.startswith("run/0/") and docs[2069].id.startswith("run/1/")
    assert docs[2067].text == docs[0].text


def test_a_rate_of_zero_is_refused(settings):
    with pytest.raises(ConfigError, match="--rate and --seconds must be positive"):
        bench_freshness(settings, rate=0, seconds=5, out_dir=settings.home)
