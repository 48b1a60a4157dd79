"""The image path on a CUDA machine that has torch and transformers but neither Ray nor the
registries: Riverbed's own image-text model's vectors in fp16 on the GPU against the CPU's fp32
ones, image embedding throughput, and a full LiT training run of the real training loop.

Two steps, because the GPU machine can read nothing but what is carried to it:

``prepare DIR`` (here, in the project's venv, the trained model in the cache) writes to DIR:

- ``model/``: the trained model's files, its weights without the text tower (images never pass
  through it: texts go through the text embedder, as ``actors.image_model`` does it), which
  ``VisionTextDualEncoderModel`` fills with fresh weights on loading;
- ``test/`` and ``train/``: easy-vqa's images, ``captions.json`` the caption of each;
- ``captions.npy``: the text embedder's vectors of the distinct captions (the index's text space);
- ``cpu_test.npy``: ``ImageTextModel.images`` of the test images on the CPU, fp32;
- ``finetune.json``: the training settings of the trained model.

``run DIR OUT`` (there; pydantic carried as wheels) writes ``OUT/images-gpu.json``:

- **agreement:** the test images through the model as ``actors.image_model`` loads it for CUDA
  (fp16 weights), cosine to the CPU's vectors, and both sides' zero-shot scores;
- **throughput:** images per second, decoding and preprocessing included, at two batch sizes;
- **training:** ``cluster.lit_training``'s loop (``_fit``: batches, loss, schedule, validation) on
  the GPU with the model's settings, epoch time, and the trained tower's test-split scores.

Reproduce (device time about 2 minutes)::

    .venv/bin/python scripts/device_images.py prepare .gpu/images
    # on the GPU machine, carrying .gpu and the wheels of pydantic, pydantic-settings,
    # python-dotenv, annotated-types, typing-inspection and pydantic-core for its Python:
    python3 scripts/device_images.py run .gpu/images "$OUT"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 64  # images.batch_size's default: what the image embedder passes per forward pass


def prepare(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    from actors.image_model import ImageTextModel
    from actors.models import resolve_image_model
    from cluster.image_datasets import load_image_dataset
    from schemas.settings import load_settings

    settings = load_settings()
    location = Path(resolve_image_model(settings.images, settings.embed.model, settings.cache_dir).location)
    shutil.rmtree(directory, ignore_errors=True)
    model_dir = directory / "model"
    model_dir.mkdir(parents=True)
    for path in location.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, model_dir / path.name)
    weights = load_file(location / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("text_model.")}, model_dir / "model.safetensors"
    )

    captions: dict[str, dict[str, str]] = {}
    for split in ("test", "train"):
        (directory / split).mkdir()
        captions[split] = {}
        for item in load_image_dataset("easy-vqa", split).items:
            shutil.copy(item.path, directory / split / f"{item.id}.png")
            captions[split][f"{item.id}.png"] = item.caption
    (directory / "captions.json").write_text(json.dumps(captions))

    model = ImageTextModel(settings.images, text_model=settings.embed.model, cache_dir=settings.cache_dir)
    distinct = sorted(set(captions["train"].values()) | set(captions["test"].values()))
    np.save(directory / "captions.npy", model.embed_texts(distinct))
    (directory / "distinct.json").write_text(json.dumps(distinct))
    images = _open(directory / "test", list(captions["test"]))
    np.save(
        directory / "cpu_test.npy",
        np.concatenate([model.embed_images(images[s : s + BATCH]) for s in range(0, len(images), BATCH)]),
    )
    (directory / "finetune.json").write_text(settings.images.finetune.model_dump_json())
    print(
        f"prepared {directory}: {len(images)} test images, {len(captions['train'])} train images, "
        f"{len(distinct)} captions"
    )


def _open(directory: Path, names: list[str]) -> list[Any]:
    from PIL import Image

    opened = []
    for name in names:
        with Image.open(directory / name) as image:
            opened.append(image.convert("RGB"))
    return opened


def run(directory: Path, out: Path, device_name: str = "cuda", epochs: int | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoImageProcessor, VisionTextDualEncoderModel

    from actors.image_model import _image_features
    from cluster.eval.images import zero_shot_scores

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    captions = json.loads((directory / "captions.json").read_text())
    distinct = json.loads((directory / "distinct.json").read_text())
    caption_vectors = np.load(directory / "captions.npy")
    test_names = list(captions["test"])
    test_labels = [captions["test"][n] for n in test_names]
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    report: dict[str, Any] = {"device": gpu_name or device_name, "torch": torch.__version__}

    # AGREEMENT: loaded as actors.image_model's _LitEncoder loads it for CUDA (fp16 weights)
    model: Any = VisionTextDualEncoderModel.from_pretrained(directory / "model")
    processor = AutoImageProcessor.from_pretrained(directory / "model")
    model.text_model = None
    model = model.half().to(device).eval()
    dtype = next(model.parameters()).dtype
    images = _open(directory / "test", test_names)

    def embed(batch: int, items: list[Any]) -> np.ndarray:
        rows = [
            _image_features(processor, model, device, dtype, items[s : s + batch])
            for s in range(0, len(items), batch)
        ]
        vectors = np.concatenate(rows)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    gpu = embed(BATCH, images)
    cpu = np.load(directory / "cpu_test.npy")
    cosines = np.sum(gpu * cpu, axis=1)
    report["agreement"] = {
        "images": len(images),
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "gpu_fp16": zero_shot_scores(gpu, test_labels, caption_vectors, distinct),
        "cpu_fp32": zero_shot_scores(cpu, test_labels, caption_vectors, distinct),
    }
    print(json.dumps(report["agreement"], indent=1), flush=True)

    # THROUGHPUT: decoding (PIL) and preprocessing included, as the image embedder does them
    throughput = {}
    for batch in (BATCH, 512):
        embed(batch, images)  # warm-up
        sync()
        started = time.perf_counter()
        for _ in range(4):
            embed(batch, _open(directory / "test", test_names))
        sync()
        throughput[f"batch_{batch}"] = 4 * len(images) / (time.perf_counter() - started)
    report["images_per_s"] = throughput
    print(json.dumps(throughput), flush=True)

    report["training"] = _train(
        directory, captions, distinct, caption_vectors, test_names, test_labels, device, epochs
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "images-gpu.json").write_text(json.dumps(report, indent=1))
    return report


def _train(
    directory: Path,
    captions: dict[str, dict[str, str]],
    distinct: list[str],
    caption_vectors: np.ndarray,
    test_names: list[str],
    test_labels: list[str],
    device: Any,
    epochs: int | None,
) -> dict[str, Any]:
    """cluster.lit_training's loop on one GPU worker, as Ray Train's train_loop runs it."""
    import torch
    import torch.nn.functional as F

    from actors.lit_model import vision_tower
    from cluster.eval.images import zero_shot_scores
    from cluster.image_datasets import CaptionedImage
    from cluster.lit_training import _fit, _pixels, _Run, epoch_plans, validation_cut
    from schemas.settings import ImageFinetuneConfig

    finetune = ImageFinetuneConfig.model_validate_json((directory / "finetune.json").read_text())
    if epochs is not None:  # a short dry run of the script
        finetune = finetune.model_copy(update={"epochs": epochs})
    torch.manual_seed(finetune.seed)
    train = [CaptionedImage(n, directory / "train" / n, c) for n, c in captions["train"].items()]
    label_of = {caption: i for i, caption in enumerate(distinct)}
    labels = [label_of[item.caption] for item in train]
    kept, validation = validation_cut(labels, finetune.validation_fraction, finetune.seed)
    started = time.perf_counter()
    pixels = _pixels(train, finetune.image_size)
    run = _Run(finetune, 0, device, pixels, labels, distinct, caption_vectors, validation, None)
    tower = vision_tower(finetune, caption_vectors.shape[1]).to(device)
    history = _fit(run, tower, epoch_plans(labels, kept, finetune, 0, 1), lambda metrics: None)
    total_s = time.perf_counter() - started
    test = [
        CaptionedImage(n, directory / "test" / n, c) for n, c in zip(test_names, test_labels, strict=True)
    ]
    tower.eval()
    with torch.no_grad():
        test_pixels = _pixels(test, finetune.image_size).to(device)
        vectors = F.normalize(tower(test_pixels), dim=-1).cpu().numpy()
    result = {
        "train_images": len(kept),
        "epochs": len(history),
        "epoch_s": [round(h["epoch_s"], 2) for h in history],
        "total_s": total_s,
        "last_epoch": {k: v for k, v in history[-1].items() if k != "epoch_s"},
        "test": zero_shot_scores(vectors, test_labels, caption_vectors, distinct),
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("directory", type=Path)
    on_gpu = commands.add_parser("run")
    on_gpu.add_argument("directory", type=Path)
    on_gpu.add_argument("out", type=Path)
    on_gpu.add_argument("--device", default="cuda", help="cpu: a dry run of the script here")
    on_gpu.add_argument("--epochs", type=int, help="fewer training epochs than the model's (a dry run)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory)
    else:
        run(args.directory, args.out, args.device, args.epochs)


if __name__ == "__main__":
    main()
