"""Zero-shot image-text scores on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.eval.images import zero_shot_scores

CAPTIONS = ["a red circle", "a red square", "a blue circle"]
EYE = np.eye(3, dtype=np.float32)


def test_images_on_their_captions_score_perfectly() -> None:
    labels = [
        "a red circle",
        "a red circle",
        "a red square",
        "a red square",
        "a blue circle",
        "a blue circle",
    ]
    images = EYE[[0, 0, 1, 1, 2, 2]]
    scores = zero_shot_scores(images, labels, EYE, CAPTIONS, k=2)
    assert scores["caption_accuracy"] == 1.0 and scores["chance_accuracy"] == pytest.approx(1 / 3)
    assert scores["text_to_image_p@2"] == 1.0 and scores["text_to_image_r@2"] == 1.0
    assert scores["image_to_image_p@2"] == pytest.approx(0.5)  # one same-caption neighbour of two
    assert (scores["images"], scores["captions"]) == (6, 3)


def test_a_misplaced_image_costs_accuracy_and_precision() -> None:
    labels = ["a red circle", "a red circle", "a red square", "a red square"]
    images = EYE[[0, 1, 1, 1]]  # the second red circle looks like a red square
    scores = zero_shot_scores(images, labels, EYE, CAPTIONS, k=2)
    assert scores["caption_accuracy"] == 0.75
    # "a red circle": top 2 = image 0 (hit) and the first of the tied 1, 2, 3 (image 1: hit);
    # "a red square": images 1, 2 (one hit). Captions without images are not queries.
    assert scores["text_to_image_p@2"] == pytest.approx((1.0 + 0.5) / 2)


def test_precision_divides_by_k_even_when_fewer_images_are_relevant() -> None:
    scores = zero_shot_scores(EYE[[0, 1]], ["a red circle", "a red square"], EYE, CAPTIONS, k=10)
    assert scores["text_to_image_p@10"] == pytest.approx(0.1) and scores["text_to_image_r@10"] == 1.0


def test_a_label_without_a_caption_vector_is_refused() -> None:
    with pytest.raises(ValueError, match="a green circle"):
        zero_shot_scores(EYE[[0]], ["a green circle"], EYE, CAPTIONS)
