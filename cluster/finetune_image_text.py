"""`riverbed finetune image-text`: trains Riverbed's LiT image-text model on Ray Train.

# DATA: the dataset's train split (easy-vqa's, or a directory's), captioned; a seeded,
#       per-caption validation cut held out of it (the test split is never read)
# CACHE: the model's directory is named by a hash of the training settings, the data's identity
#        and the text embedder; if it exists the call returns it at once (a file lock makes a
#        concurrent call wait for the first instead of training twice)
# CAPTIONS: the distinct captions embedded once, by the index's own text embedder (the frozen
#           text tower: nothing else of it is needed to train)
# TRAIN: TorchTrainer (``images.finetune.workers`` workers, CPU or GPU) runs
#        :func:`cluster.lit_training.train_loop` (a ViT from scratch plus its projection; the loss,
#        batches and schedule are described there); progress (steps, loss, elapsed, validation
#        accuracy per epoch) comes back through a Ray queue
# SAVE: the vision tower and the text embedder assembled into a VisionTextDualEncoderModel,
#       saved with save_pretrained (+ processor + record) and moved into place atomically
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.embedder import Embedder
from actors.lit_model import LitRecord, build_lit_model, save_lit_model, vision_tower
from actors.models import resolve_model, trained_model_dir, trained_model_key
from cluster.image_datasets import ImageDataset, load_image_dataset
from cluster.lit_training import CHECKPOINT_FILE, train_loop
from cluster.ray_train import Progress, exclusive, fit_on_ray
from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    path: Path
    """The trained model's directory (in the cache)."""
    cached: bool
    """True when it was there already (nothing was trained)."""
    record: LitRecord


# THE DRIVER
def model_target(settings: Settings, data: ImageDataset) -> Path:
    """Where the model trained on ``data`` with these settings lives in the cache."""
    key = trained_model_key(settings.images.finetune, data.identity, settings.embed.model)
    return trained_model_dir(settings.cache_dir, f"lit-{data.name}", key)


def finetune_image_text(
    settings: Settings,
    dataset: str,
    *,
    out: Path | None = None,
    limit: int | None = None,
    on_progress: Progress | None = None,
) -> FinetuneResult:
    """Trains (or finds in the cache) the LiT model for ``dataset`` (``easy-vqa`` or a directory)
    with ``settings.images.finetune``, its text tower ``settings.embed.model``; ``limit`` trains on
    the first items only. With ``out``, the model is also copied there. ``on_progress`` gets
    events: ``{"kind": "step" | "epoch", ...}`` (see :mod:`cluster.lit_training`).

    Idempotent: the same settings and data find the saved model and return at once. Raises
    ConfigError for bad input, RiverbedError when training fails."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    data = load_image_dataset(dataset, "train", limit)
    target = model_target(settings, data)
    cached = True
    with exclusive(target):
        if not (target / "config.json").is_file():
            cached = False
            _train(settings, data, target, on_progress or (lambda event: None))
    record = LitRecord.read(target)
    if record is None:
        raise ConfigError(f"{target} holds no LiT record: remove it and train again")
    if out is not None:
        shutil.copytree(target, out, dirs_exist_ok=True)
    return FinetuneResult(target, cached, record)


def _train(settings: Settings, data: ImageDataset, target: Path, on_progress: Progress) -> None:
    """CAPTIONS, TRAIN, SAVE (see the module docstring) into ``target``."""
    finetune = settings.images.finetune
    captions = data.captions
    if len(captions) < 2:
        raise ConfigError(f"{data.name}: training needs at least 2 distinct captions, found {len(captions)}")
    log.info(
        "training %s on %d images of %s (%d captions; %d images left out without one)",
        *(target.name, len(data.items), data.name, len(captions), data.skipped),
    )

    # CAPTIONS
    caption_vectors = Embedder(settings.embed).embed(captions)

    # TRAIN
    config = {
        "finetune": finetune.model_dump(mode="json"),
        "dataset": data.source,
        "limit": data.limit,
        "identity": data.identity,
        "captions": captions,
        "caption_vectors": caption_vectors.tolist(),
    }
    started = time.monotonic()
    weights, history = fit_on_ray(
        settings, finetune, train_loop, config, f"{target.name}-{int(time.time())}", on_progress, _read_tower
    )
    seconds = time.monotonic() - started

    # SAVE
    tower = vision_tower(finetune, caption_vectors.shape[1])
    tower.load_state_dict(weights)
    text_location = resolve_model(settings.embed.model).location
    record = LitRecord(
        text_model=settings.embed.model,
        dim=int(caption_vectors.shape[1]),
        image_size=finetune.image_size,
        key=target.name.rsplit("-", 1)[-1],
        dataset=data.identity,
        finetune=finetune.model_dump(mode="json"),
        captions=captions,
        history=history,
        train_seconds=round(seconds, 1),
    )
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    save_lit_model(build_lit_model(tower, text_location), text_location, record, staging)
    os.replace(staging, target)
    log.info("saved %s (%.0f s of training)", target, seconds)


def _read_tower(checkpoint: Path) -> dict[str, Any]:
    import torch

    return torch.load(checkpoint / CHECKPOINT_FILE, map_location="cpu")
