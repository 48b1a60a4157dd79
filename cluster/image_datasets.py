"""Captioned image datasets: easy-vqa (the package's own data) and directories of image files.

- ``easy-vqa``: the ``easy-vqa`` package's 64x64 images of one coloured shape each, with its own
  train/test split. Captions ("a red circle") are derived from its question/answer triples
  (:func:`captions_from_questions`); images whose colour or shape the questions never settle are
  left out (3,578 of the 4,000 train and 888 of the 1,000 test images keep a caption).
- A directory: each image file (``.png .jpg .jpeg .webp .gif``) with a caption in a sidecar
  ``NAME.txt`` beside it (images without one are left out, and counted). A directory holding
  ``train/`` and ``test/`` subdirectories has those splits; otherwise the whole directory is every
  split.

Items come in a fixed order (easy-vqa: by image number; a directory: by relative path), so a cut
(``limit``) and a seeded split of the same data are the same on every machine. Each dataset has an
*identity*: the package's version, or a hash of the files' bytes and captions, plus split and cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from actors.models import PACKAGED_DATASETS, packaged_dataset_dir, packaged_dataset_identity
from schemas.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
EASY_VQA = "easy-vqa"
EASY_VQA_COLORS = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})
_NEGATIONS = frozenset({"not", "no"})


@dataclass(frozen=True)
class CaptionedImage:
    id: str
    path: Path
    caption: str


@dataclass(frozen=True)
class ImageDataset:
    name: str
    """``easy-vqa``, or the directory's name."""
    split: str
    identity: str
    items: list[CaptionedImage]
    skipped: int = 0
    """Images left out for want of a caption."""
    source: str = EASY_VQA
    """What :func:`load_image_dataset` was given (a directory: its absolute path)."""
    limit: int | None = None

    @property
    def captions(self) -> list[str]:
        """The distinct captions, sorted."""
        return sorted({item.caption for item in self.items})


def captions_from_questions(
    triples: Iterable[Sequence[object]],
    colors: frozenset[str] = EASY_VQA_COLORS,
    shapes: frozenset[str] = EASY_VQA_SHAPES,
) -> dict[int, str]:
    """``{image id: "a <colour> <shape>"}`` from easy-vqa's ``[question, answer, image id]``
    triples, for every image whose colour and shape they settle, and consistently.

    What a triple says: an answer that is a colour or a shape; a colour or shape the question takes
    as given ("what color is the *triangle*?", "what is the *red* shape?"); and a yes/no question
    affirms the colour or shape it names ("is there a circle?" yes, "is there not a circle?" no) or
    denies it ("is there a circle?" no, "is no circle present?" yes). Each image holds one shape
    of one colour, so an image's colour (shape) is the one affirmed, or else the only one of
    ``colors`` (``shapes``) not denied. An image with two affirmed, or one affirmed and denied, is
    left out, as is one whose colour or shape stays open.
    """
    facts: dict[int, dict[str, set[str]]] = {}
    for triple in triples:
        question, answer, image = str(triple[0]), str(triple[1]).strip().lower(), int(str(triple[2]))
        words = re.findall(r"[a-z]+", question.lower())
        fact = facts.setdefault(
            image, {"color": set(), "shape": set(), "not color": set(), "not shape": set()}
        )
        if answer in ("yes", "no"):
            affirmed = (answer == "yes") != bool(_NEGATIONS & set(words))
            prefix = "" if affirmed else "not "
            fact[prefix + "color"].update(w for w in words if w in colors)
            fact[prefix + "shape"].update(w for w in words if w in shapes)
        else:
            fact["color"].update(w for w in [answer, *words] if w in colors)
            fact["shape"].update(w for w in [answer, *words] if w in shapes)
    captions = {}
    for image, fact in sorted(facts.items()):
        color = _settled(fact["color"], fact["not color"], colors)
        shape = _settled(fact["shape"], fact["not shape"], shapes)
        if color and shape:
            captions[image] = f"a {color} {shape}"
    return captions


def _settled(affirmed: set[str], denied: set[str], vocabulary: frozenset[str]) -> str | None:
    """The one value the facts leave, or None (none, several, or a contradiction)."""
    if affirmed & denied or len(affirmed) > 1:
        return None
    remaining = affirmed or (vocabulary - denied)
    return next(iter(remaining)) if len(remaining) == 1 else None


def load_easy_vqa(split: str) -> ImageDataset:
    """easy-vqa's ``train`` or ``test`` split, captioned. ConfigError when the package is missing."""
    if split not in ("train", "test"):
        raise ConfigError(f"easy-vqa has the splits train and test, not {split!r}")
    data = packaged_dataset_dir(EASY_VQA)
    vocabulary = set((data / "answers.txt").read_text(encoding="utf-8").split())
    if vocabulary != EASY_VQA_COLORS | EASY_VQA_SHAPES | {"yes", "no"}:
        raise ConfigError(
            f"{data}/answers.txt holds other answers than the captions know: {sorted(vocabulary)}"
        )
    root = data / split
    triples = json.loads((root / "questions.json").read_text(encoding="utf-8"))
    captions = captions_from_questions(triples)
    images = {int(p.stem): p for p in (root / "images").glob("*.png") if p.stem.isdigit()}
    items = [CaptionedImage(f"{split}-{n}", images[n], captions[n]) for n in sorted(images) if n in captions]
    identity = f"{packaged_dataset_identity(EASY_VQA)}:{split}"
    return ImageDataset(EASY_VQA, split, identity, items, skipped=len(images) - len(items))


def read_image_dir(directory: Path) -> tuple[list[CaptionedImage], int]:
    """The captioned images under ``directory`` (recursively, by relative path) and how many image
    files had no caption (no ``NAME.txt``, or an empty one)."""
    items, skipped = [], 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        caption = " ".join(sidecar.read_text(encoding="utf-8").split()) if sidecar.is_file() else ""
        if not caption:
            skipped += 1
            continue
        items.append(CaptionedImage(path.relative_to(directory).as_posix(), path, caption))
    return items, skipped


def content_identity(items: Sequence[CaptionedImage]) -> str:
    """A hash of the items' ids, captions and image bytes (16 hex digits)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, item.caption]).encode())
        digest.update(hashlib.sha256(item.path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def load_image_dataset(spec: str, split: str, limit: int | None = None) -> ImageDataset:
    """``spec`` (``easy-vqa`` or a directory) at ``split``, cut to its first ``limit`` items.
    ConfigError when the dataset is missing, unknown, or has no captioned image."""
    if spec in PACKAGED_DATASETS:
        dataset = load_easy_vqa(split)
    else:
        directory = Path(spec).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"dataset {spec!r} is neither {EASY_VQA!r} nor a directory")
        has_splits = (directory / "train").is_dir() and (directory / "test").is_dir()
        if has_splits and split not in ("train", "test"):
            raise ConfigError(f"{directory} has the splits train and test, not {split!r}")
        items, skipped = read_image_dir(directory / split if has_splits else directory)
        name = directory.resolve().name or "images"
        identity = f"dir:{content_identity(items)}:{split if has_splits else 'all'}"
        dataset = ImageDataset(name, split, identity, items, skipped, str(directory.resolve()))
    if limit is not None:
        dataset = dataclasses.replace(
            dataset, identity=f"{dataset.identity}[:{limit}]", items=dataset.items[:limit], limit=limit
        )
    if not dataset.items:
        raise ConfigError(f"dataset {spec!r} ({split}) has no captioned image")
    return dataset
