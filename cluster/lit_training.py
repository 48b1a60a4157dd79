"""What each Ray Train worker does to train the LiT vision tower, and its pure parts.

The text tower is frozen, so the captions' vectors are fixed: the driver embeds the distinct
captions once and hands them over, and a worker fits only the ViT and its projection (a
:func:`actors.lit_model.vision_tower`) to them:

- **Loss:** CLIP's symmetric contrastive loss (image -> caption and caption -> image
  cross-entropy over the batch), on cosine similarities scaled by a learnable temperature
  (clamped at 100, as CLIP does).
- **Batches** (:func:`label_aware_batches`): no caption twice in a batch. The loss takes every
  other image of the batch as a negative for a caption, which is false when two share it; with
  easy-vqa's 24 captions, random batches of 24 would nearly all hold such a pair.
- **Schedule:** AdamW (no weight decay on biases, norms and the temperature), linear warm-up then
  cosine decay (:func:`lr_factor`); random horizontal flips (:func:`augment`).
- **Validation:** a seeded cut of each caption's images (:func:`validation_cut`) is held out and
  scored after each epoch with the vectors the saved model will give (caption accuracy and
  text -> image precision, :func:`cluster.eval.images.zero_shot_scores`).
- **Several workers** split each epoch's batches (data-parallel; ``prepare_model`` wraps the
  tower in DDP) and all run the same number of steps. Rank 0 validates, sends progress and
  reports the final weights as a Ray Train checkpoint (``tower.pt``, a state dict).

Preprocessing is the saved processor's own (:func:`actors.lit_model.image_processor`), applied once
to every image up front: what the model trains on is what it sees at inference.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.embedder import cpu_threads
from actors.lit_model import LOGIT_SCALE_MAX, image_processor, vision_tower
from cluster.eval.images import zero_shot_scores
from cluster.image_datasets import CaptionedImage, load_image_dataset
from schemas.errors import ConfigError
from schemas.settings import ImageFinetuneConfig

PROGRESS_EVERY_S = 5.0
CHECKPOINT_FILE = "tower.pt"


# PURE PARTS
def label_aware_batches(labels: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Every position of ``labels`` once, in batches of at most ``batch_size`` in which no label
    repeats (so a batch is at most as large as the number of distinct labels).

    Each batch takes one item from each of the labels with the most items left (ties broken at
    random), so labels run out together and few small batches remain at the end. Items of a label
    are drawn in a random order, and the batches are returned shuffled.
    """
    pools: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        pools.setdefault(label, []).append(position)
    for pool in pools.values():
        rng.shuffle(pool)
    batches = []
    while pools:
        chosen = sorted(pools, key=lambda label: (-len(pools[label]), rng.random()))[:batch_size]
        batch = [pools[label].pop() for label in chosen]
        for label in chosen:
            if not pools[label]:
                del pools[label]
        rng.shuffle(batch)
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def validation_cut(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train positions, validation positions)``: ``fraction`` of each label's items (rounded,
    at least one where the label has two or more) held out, chosen by ``seed``."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    train, held = [], []
    for label in sorted(by_label):
        pool = by_label[label]
        rng.shuffle(pool)
        n = 0 if fraction <= 0 else max(1 if len(pool) > 1 else 0, round(fraction * len(pool)))
        held += pool[:n]
        train += pool[n:]
    return sorted(train), sorted(held)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``total``: linear from 0 to 1 over
    ``warmup`` steps, then a cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def epoch_plans(
    labels: Sequence[int], train: Sequence[int], finetune: ImageFinetuneConfig, rank: int, world: int
) -> list[list[list[int]]]:
    """For each epoch, this worker's batches (positions into ``labels``): the epoch's
    label-aware batches dealt round-robin, cut so that every worker gets as many."""
    size = min(finetune.batch_size, len(set(labels)))
    plans = []
    for epoch in range(finetune.epochs):
        rng = random.Random(finetune.seed * 7919 + epoch)
        batches = label_aware_batches([labels[p] for p in train], size, rng)
        per_worker = len(batches) // world
        plans.append([[train[i] for i in b] for b in batches[rank::world][:per_worker]])
    return plans


# THE WORKER
@dataclass
class _Run:
    """One worker's inputs and state."""

    finetune: ImageFinetuneConfig
    rank: int
    device: Any
    pixels: Any
    labels: list[int]
    captions: list[str]
    caption_vectors: np.ndarray
    validation: list[int]
    queue: Any
    started: float = field(default_factory=time.monotonic)

    def tell(self, event: dict[str, Any]) -> None:
        """Sends progress to the driver (rank 0 only; best effort: training goes on without)."""
        if self.queue is not None and self.rank == 0:
            with contextlib.suppress(Exception):
                self.queue.put_nowait(event)


def _pixels(items: Sequence[CaptionedImage], image_size: int) -> Any:
    """The images as the saved processor prepares them: ``(n, 3, s, s)`` float32."""
    import torch
    from PIL import Image

    processor = image_processor(image_size)
    chunks = []
    for start in range(0, len(items), 256):
        images = []
        for item in items[start : start + 256]:
            with Image.open(item.path) as image:
                images.append(image.convert("RGB"))
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``finetune`` (the settings as a dict),
    ``dataset`` and ``limit`` (what :func:`load_image_dataset` reads), ``identity`` (checked
    against what this worker read), ``captions`` and ``caption_vectors`` (unit rows, one per
    caption), ``queue`` (a ``ray.util.queue.Queue`` for progress, or None)."""
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    finetune = ImageFinetuneConfig.model_validate(config["finetune"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(finetune.num_cpus))
    torch.manual_seed(finetune.seed)
    data = load_image_dataset(config["dataset"], "train", config["limit"])
    if data.identity != config["identity"]:
        raise ConfigError(
            f"worker {rank} read {data.identity}, the driver {config['identity']}: not the same data"
        )
    captions: list[str] = config["captions"]
    label_of = {caption: i for i, caption in enumerate(captions)}
    labels = [label_of[item.caption] for item in data.items]
    train, validation = validation_cut(labels, finetune.validation_fraction, finetune.seed)
    vectors = np.asarray(config["caption_vectors"], dtype=np.float32)
    pixels = _pixels(data.items, finetune.image_size)
    run = _Run(finetune, rank, device, pixels, labels, captions, vectors, validation, config.get("queue"))

    model = ray.train.torch.prepare_model(vision_tower(finetune, vectors.shape[1]))
    plans = epoch_plans(labels, train, finetune, rank, world)
    history = _fit(run, model, plans, ray.train.report)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(_core(model).state_dict(), Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({**history[-1], "history": history}, checkpoint=checkpoint)


def _core(model: Any) -> Any:
    """The tower inside a DDP wrapper (or the tower)."""
    return model.module if hasattr(model, "module") else model


def _fit(
    run: _Run, model: Any, plans: list[list[list[int]]], report: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Trains over ``plans`` (epochs of batches); returns each epoch's metrics, given to ``report``
    (Ray Train's) after every epoch but the last, which the caller reports with the checkpoint."""
    import torch

    core = _core(model)
    decay = [p for p in core.parameters() if p.ndim >= 2]
    rest = [p for p in core.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": run.finetune.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=run.finetune.lr,
    )
    total = sum(len(plan) for plan in plans)
    warmup = int(run.finetune.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    text = torch.from_numpy(run.caption_vectors).to(run.device)
    flips = torch.Generator().manual_seed(run.finetune.seed + run.rank)
    history: list[dict[str, Any]] = []
    step, last_told = 0, 0.0
    for epoch, plan in enumerate(plans):
        model.train()
        epoch_started, losses = time.monotonic(), []
        for batch in plan:
            losses.append(_step(run, model, core, text, batch, flips))
            optimizer.step()
            scheduler.step()
            step += 1
            if time.monotonic() - last_told >= PROGRESS_EVERY_S:
                last_told = time.monotonic()
                recent = losses[-20:]
                run.tell(
                    {"kind": "step", "epoch": epoch + 1, "epochs": len(plans), "step": step, "steps": total}
                    | {"loss": sum(recent) / len(recent), "elapsed_s": last_told - run.started}
                )
        metrics = _epoch_metrics(run, core, epoch, step, losses, epoch_started)
        history.append(metrics)
        run.tell({"kind": "epoch", "epochs": len(plans), **metrics})
        if epoch + 1 < len(plans):
            report(metrics)
    return history


def _step(run: _Run, model: Any, core: Any, text: Any, batch: list[int], flips: Any) -> float:
    """Forward and backward of one batch (the caller steps the optimizer); returns the loss."""
    import torch
    import torch.nn.functional as F

    x = augment(run.pixels[torch.tensor(batch)], run.finetune, flips)
    targets = text[torch.tensor([run.labels[i] for i in batch], device=run.device)]
    features = F.normalize(model(x.to(run.device)), dim=-1)
    logits = core.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * features @ targets.T
    order = torch.arange(len(batch), device=run.device)
    loss = (F.cross_entropy(logits, order) + F.cross_entropy(logits.T, order)) / 2
    core.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach())


def augment(x: Any, finetune: ImageFinetuneConfig, generator: Any) -> Any:
    """``x`` (a batch of processed images), each flipped left to right with probability 1/2 when
    ``finetune.flip``."""
    import torch

    if not finetune.flip:
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _epoch_metrics(
    run: _Run, core: Any, epoch: int, step: int, losses: list[float], started: float
) -> dict[str, Any]:
    now = time.monotonic()
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "steps": step,
        "loss": sum(losses) / max(1, len(losses)),
        "epoch_s": now - started,
        "elapsed_s": now - run.started,
        "temperature": float(core.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX).exp()),
    }
    if run.validation and run.rank == 0:
        metrics.update(_validate(run, core))
    return metrics


def _validate(run: _Run, core: Any) -> dict[str, float]:
    """Zero-shot scores of the validation cut (``val_caption_accuracy``,
    ``val_text_to_image_p_at_10``...), from the vectors the saved model will give."""
    import torch
    import torch.nn.functional as F

    core.eval()
    pixels = run.pixels[torch.tensor(run.validation)]
    with torch.no_grad():
        chunks = [
            F.normalize(core(pixels[s : s + 256].to(run.device)), dim=-1).cpu()
            for s in range(0, len(pixels), 256)
        ]
    labels = [run.captions[run.labels[p]] for p in run.validation]
    scores = zero_shot_scores(torch.cat(chunks).numpy(), labels, run.caption_vectors, run.captions)
    core.train()
    return {
        "val_" + key.replace("@", "_at_"): value
        for key, value in scores.items()
        if isinstance(value, float) and key != "chance_accuracy"
    }
