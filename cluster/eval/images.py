"""Zero-shot image-text quality: caption accuracy and retrieval precision over captioned images.

Pure functions of vectors (:func:`zero_shot_scores`), and :func:`evaluate_image_text`, which
embeds a dataset with a model and scores it. Relevance is caption equality: for easy-vqa, the
same colour and shape. Used after training (``riverbed finetune image-text --evaluate``) and by
the training loop on its validation cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

    from cluster.image_datasets import ImageDataset


class ImageTextEncoder(Protocol):
    """What scoring needs of a model (:class:`actors.image_model.ImageTextModel` has it)."""

    def embed_images(self, images: Sequence[Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` best scores, best first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def zero_shot_scores(
    image_vectors: np.ndarray,
    labels: Sequence[str],
    caption_vectors: np.ndarray,
    captions: Sequence[str],
    k: int = 10,
) -> dict[str, Any]:
    """Scores of unit-norm ``image_vectors`` (one per image, captioned ``labels``) against
    unit-norm ``caption_vectors`` (one per distinct caption in ``captions``; cosine = dot):

    - ``caption_accuracy``: share of images whose most similar caption is their own (chance:
      1 / number of captions);
    - ``text_to_image_p@k`` / ``r@k``: each caption as a query over all images, relevant = the
      images with that caption; precision and recall at ``k``, averaged over captions;
    - ``image_to_image_p@k``: each image as a query over the others, averaged over images.
    """
    index = {caption: i for i, caption in enumerate(captions)}
    missing = sorted(set(labels) - set(index))
    if missing:
        raise ValueError(f"labels without a caption vector: {missing[:5]}")
    truth = np.asarray([index[label] for label in labels], dtype=np.int64)
    images = np.asarray(image_vectors, dtype=np.float32)
    texts = np.asarray(caption_vectors, dtype=np.float32)
    n = len(truth)
    accuracy = float(np.mean(np.argmax(images @ texts.T, axis=1) == truth)) if n else 0.0

    present = [c for c in range(len(captions)) if np.any(truth == c)]
    top = _top_k(texts[present] @ images.T, min(k, n))
    hits = truth[top] == np.asarray(present)[:, None]
    relevant = np.asarray([np.sum(truth == c) for c in present])
    p_text = float(np.mean(hits.sum(axis=1) / k)) if present else 0.0
    r_text = float(np.mean(hits.sum(axis=1) / relevant)) if present else 0.0

    p_image = 0.0
    if n > 1:
        similarity = images @ images.T
        np.fill_diagonal(similarity, -np.inf)  # an image is not its own neighbour
        neighbours = _top_k(similarity, min(k, n - 1))
        p_image = float(np.mean((truth[neighbours] == truth[:, None]).sum(axis=1) / k))
    return {
        "images": n,
        "captions": len(captions),
        "chance_accuracy": 1 / len(captions) if len(captions) else 0.0,
        "caption_accuracy": accuracy,
        f"text_to_image_p@{k}": p_text,
        f"text_to_image_r@{k}": r_text,
        f"image_to_image_p@{k}": p_image,
    }


def evaluate_image_text(model: ImageTextEncoder, dataset: ImageDataset, k: int = 10) -> dict[str, Any]:
    """:func:`zero_shot_scores` of ``model`` on ``dataset``: every image against the dataset's
    distinct captions, embedded as text by the model."""
    from PIL import Image as PILImage

    images = []
    for item in dataset.items:
        with PILImage.open(item.path) as image:
            images.append(image.convert("RGB"))
    captions = dataset.captions
    scores = zero_shot_scores(
        model.embed_images(images),
        [item.caption for item in dataset.items],
        model.embed_texts(captions),
        captions,
        k,
    )
    return {"dataset": dataset.name, "split": dataset.split, "identity": dataset.identity, **scores}
