"""`riverbed bench images`' arithmetic: a run against the raw forwards around it."""

import pytest

from cluster.bench.images import _run_row, bench_images
from schemas.errors import ConfigError
from schemas.settings import Settings


def test_a_run_is_measured_against_the_mean_of_the_raw_forwards_around_it():
    run = {
        "images": 300,
        "seconds": 2.0,
        "embedder": {"calls": 3.0, "images": 300.0, "seconds": 1.5, "cpu_seconds": 1.2},
    }
    row = _run_row(2, run, raw_before=140.0, raw_after=160.0)
    assert row["run"] == 2
    assert row["raw_images_per_s"] == 150.0  # (140 + 160) / 2
    assert row["pipeline_images_per_s"] == 150.0  # 300 images in 2 s
    assert row["ratio"] == 1.0
    assert row["embedder_busy"] == 0.75  # 1.5 s of 2 embedding
    assert row["embedder_images_per_s"] == 200.0  # 300 images in its 1.5 s
    assert row["embedder_cpu_share"] == 0.8  # 1.2 s of CPU over 1.5 s
    assert (row["embedder_images"], row["embedder_calls"]) == (300, 3)


def test_a_run_without_images_reports_no_rates_rather_than_dividing_by_zero():
    run = {
        "images": 0,
        "seconds": 1.0,
        "embedder": {"calls": 0.0, "images": 0.0, "seconds": 0.0, "cpu_seconds": 0.0},
    }
    row = _run_row(1, run, raw_before=0.0, raw_after=0.0)  # no images: no raw rate either
    assert (row["embedder_busy"], row["embedder_images_per_s"], row["embedder_cpu_share"]) == (0.0, 0.0, 0.0)
    assert row["ratio"] == 0.0


def test_no_runs_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="runs must be at least 1, not 0"):
        bench_images(Settings(), "no-such-dataset", "test", None, tmp_path, runs=0)
