"""The image-text trainer's pure parts (batches, validation cut, schedule), its cache keys, and a
cached model found without training (no Ray: the unit tier refuses it)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from actors.lit_model import LitRecord
from actors.models import (
    resolve_image_model,
    trained_image_model_dir,
    trained_model_dir,
    trained_model_key,
)
from cluster.finetune_image_text import finetune_image_text, model_target
from cluster.image_datasets import load_image_dataset
from cluster.lit_training import epoch_plans, label_aware_batches, lr_factor, validation_cut
from schemas.errors import ConfigError
from schemas.settings import ImageFinetuneConfig, load_settings

LABELS = [i % 5 for i in range(23)] + [0] * 6  # 5 labels, uneven: label 0 has 11 items


@pytest.mark.parametrize("batch_size", [1, 3, 5, 8])
def test_label_aware_batches_cover_every_item_once_without_repeating_a_label(batch_size: int) -> None:
    batches = label_aware_batches(LABELS, batch_size, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(len(LABELS)))
    for batch in batches:
        assert 1 <= len(batch) <= min(batch_size, 5)
        assert len({LABELS[i] for i in batch}) == len(batch), batch


def test_label_aware_batches_spend_the_largest_labels_first() -> None:
    # Label 0 has 11 items, the others 4 or 5: batches take it every time, so no batch is ever
    # left holding label 0 alone while others wait.
    batches = label_aware_batches(LABELS, 5, random.Random(1))
    assert len(batches) == Counter(LABELS).most_common(1)[0][1]


def test_label_aware_batches_follow_the_seed() -> None:
    one = label_aware_batches(LABELS, 4, random.Random(7))
    assert one == label_aware_batches(LABELS, 4, random.Random(7))
    assert one != label_aware_batches(LABELS, 4, random.Random(8))


def test_validation_cut_is_stratified_disjoint_and_seeded() -> None:
    labels = [i % 4 for i in range(40)] + [9]  # label 9 has one item: it stays in training
    train, held = validation_cut(labels, 0.25, seed=3)
    assert sorted(train + held) == list(range(41)) and not set(train) & set(held)
    assert Counter(labels[i] for i in held) == {0: 2, 1: 2, 2: 2, 3: 2}  # round(0.25 * 10) of each
    assert (train, held) == validation_cut(labels, 0.25, seed=3)
    assert held != validation_cut(labels, 0.25, seed=4)[1]
    assert validation_cut(labels, 0.0, seed=3) == (list(range(41)), [])


def test_lr_warms_up_linearly_then_decays_to_zero() -> None:
    assert [lr_factor(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4) == pytest.approx(1.0)
    assert lr_factor(52, 100, 4) == pytest.approx(0.5)
    assert lr_factor(100, 100, 4) == pytest.approx(0.0)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_workers_share_each_epochs_batches_evenly() -> None:
    finetune = ImageFinetuneConfig(epochs=2, batch_size=4)
    train = list(range(len(LABELS)))
    alone = epoch_plans(LABELS, train, finetune, rank=0, world=1)
    pair = [epoch_plans(LABELS, train, finetune, rank=r, world=2) for r in (0, 1)]
    assert len(alone) == 2 and all(len(pair[0][e]) == len(pair[1][e]) for e in range(2))
    for epoch in range(2):
        dealt = pair[0][epoch] + pair[1][epoch]
        assert all(batch in alone[epoch] for batch in dealt)  # the same batches, dealt out
        assert len(alone[epoch]) - len(dealt) in (0, 1)  # an odd one out is dropped
    assert alone[0] != alone[1]  # each epoch draws anew


def test_the_key_follows_what_makes_the_model_not_where_it_trains() -> None:
    base = ImageFinetuneConfig()
    key = trained_model_key(base, "easy-vqa==1.0:train", "m")
    assert len(key) == 16 and key == trained_model_key(ImageFinetuneConfig(), "easy-vqa==1.0:train", "m")
    for changed in ({"epochs": 7}, {"lr": 1e-4}, {"hidden_size": 96}, {"seed": 1}, {"flip": False}):
        assert trained_model_key(base.model_copy(update=changed), "easy-vqa==1.0:train", "m") != key
    assert trained_model_key(base, "easy-vqa==1.0:train[:100]", "m") != key
    assert trained_model_key(base, "easy-vqa==1.0:train", "other-text-model") != key
    for resource in ({"workers": 4}, {"use_gpu": True}, {"num_cpus": 2.0}, {"storage_path": "s3://b/p"}):
        assert trained_model_key(base.model_copy(update=resource), "easy-vqa==1.0:train", "m") == key


def test_trained_model_dirs_are_path_safe(tmp_path: Path) -> None:
    assert (
        trained_model_dir(tmp_path, "lit-my images/x", "abc") == tmp_path / "models" / "lit-my-images-x-abc"
    )


def test_the_trainer_and_the_resolver_agree_on_the_default_models_place(tmp_path: Path) -> None:
    settings = load_settings(overrides={"cache_dir": str(tmp_path)})
    where = trained_image_model_dir(settings.images, settings.embed.model, settings.cache_dir)
    assert model_target(settings, load_image_dataset("easy-vqa", "train")) == where
    assert where.parent == tmp_path / "models" and where.name.startswith("lit-easy-vqa-")


def test_an_untrained_default_model_says_how_to_train_it(tmp_path: Path) -> None:
    settings = load_settings(overrides={"cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="riverbed finetune image-text --dataset easy-vqa"):
        resolve_image_model(settings.images, settings.embed.model, settings.cache_dir)


def test_a_cached_model_returns_at_once_without_training(tmp_path: Path) -> None:
    settings = load_settings(overrides={"cache_dir": str(tmp_path / "cache")})
    target = model_target(settings, load_image_dataset("easy-vqa", "train"))
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    LitRecord(text_model=settings.embed.model, dim=384, image_size=64).write(target)
    result = finetune_image_text(settings, "easy-vqa", out=tmp_path / "copy")  # Ray would raise here
    assert result.cached and result.path == target and result.record.dim == 384
    assert (tmp_path / "copy" / "riverbed_lit.json").is_file()
    resolved = resolve_image_model(settings.images, settings.embed.model, settings.cache_dir)
    assert resolved.location == str(target) and resolved.name == "riverbed/lit-easy-vqa"


def test_a_bad_limit_is_refused(tmp_path: Path) -> None:
    settings = load_settings(overrides={"cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="limit"):
        finetune_image_text(settings, "easy-vqa", limit=0)


def test_the_worker_loop_learns_two_captions_without_ray() -> None:
    """_fit on synthetic images (red or blue squares) with fixed caption vectors: the loss falls
    and the validation cut ends up fully right. Its reports (Ray Train's in a run) are collected."""
    import numpy as np
    import torch

    from actors.lit_model import vision_tower
    from cluster.lit_training import _fit, _Run

    reports: list[dict] = []
    finetune = ImageFinetuneConfig(
        image_size=8, patch_size=4, hidden_size=16, num_layers=1, num_heads=2, epochs=4, lr=1e-2
    )
    torch.manual_seed(0)
    labels = [i % 2 for i in range(40)]
    pixels = torch.zeros(40, 3, 8, 8)
    for i, label in enumerate(labels):
        pixels[i, 0 if label == 0 else 2] = 1.0  # red or blue
    pixels += 0.1 * torch.randn_like(pixels)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, 12)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    train, held = validation_cut(labels, 0.25, seed=0)
    events: list[dict] = []

    class Queue:
        def put_nowait(self, event: dict) -> None:
            events.append(event)

    run = _Run(finetune, 0, torch.device("cpu"), pixels, labels, ["red", "blue"], vectors, held, Queue())
    plans = epoch_plans(labels, train, finetune, 0, 1)
    history = _fit(run, vision_tower(finetune, 12), plans, reports.append)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert reports == history[:3], "every epoch but the last, which goes with the weights"
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_caption_accuracy"] == 1.0
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2, 3, 4]
