"""A tiny LiT training run on Ray Train (the session's Ray): it learns, saves a model
ImageTextModel loads, reports progress, and a second call finds it in the cache."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from actors.image_model import ImageTextModel
from cluster.eval.images import evaluate_image_text
from cluster.finetune_image_text import finetune_image_text
from cluster.image_datasets import load_image_dataset
from schemas.settings import load_settings
from tests.integration.conftest import TINY_LIT, TINY_LIT_IMAGES


def _train_controllers_alive_after(seconds: float) -> list[int]:
    """Pids of this machine's Ray Train controller actors still alive once ``seconds`` have
    passed (or as soon as there are none). An actor's worker process is titled ``ray::<Class>``
    while it hosts the actor (the session's Ray runs no dashboard for the state API)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::TrainController"):
                alive.append(process.pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def test_a_tiny_training_run_beats_chance_by_far(tmp_path: Path, ray_session: None) -> None:
    settings = load_settings(
        overrides={
            "home": str(tmp_path / "home"),
            "cache_dir": str(tmp_path / "cache"),
            "images": {"finetune": TINY_LIT},
        }
    )
    events: list[dict] = []
    started = time.monotonic()
    result = finetune_image_text(settings, "easy-vqa", limit=TINY_LIT_IMAGES, on_progress=events.append)
    assert not result.cached and result.path.is_dir()
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == list(range(1, 13))
    assert len(result.record.history) == 12 and result.record.dataset.endswith(f":train[:{TINY_LIT_IMAGES}]")
    assert result.record.captions == load_image_dataset("easy-vqa", "train", limit=TINY_LIT_IMAGES).captions
    assert not list((tmp_path / "cache" / "ray-train").glob("*")), (
        "the Ray Train run directory is left behind"
    )
    assert _train_controllers_alive_after(30) == [], "the finished run's controller actor lives on"

    model = ImageTextModel(
        settings.images.model_copy(update={"model": str(result.path)}),
        text_model=settings.embed.model,
        cache_dir=settings.cache_dir,
    )
    scores = evaluate_image_text(model, load_image_dataset("easy-vqa", "test", limit=240))
    print(f"tiny run: {time.monotonic() - started:.0f} s, {scores}")
    assert scores["chance_accuracy"] == pytest.approx(1 / 24)
    assert scores["caption_accuracy"] >= 0.3, scores
    assert scores["text_to_image_p@10"] >= 0.3, scores

    again = time.monotonic()
    cached = finetune_image_text(settings, "easy-vqa", limit=TINY_LIT_IMAGES)
    assert cached.cached and cached.path == result.path and time.monotonic() - again < 10
