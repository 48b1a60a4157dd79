"""Captioned image datasets: the easy-vqa caption parser, the package's data, directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cluster.image_datasets import (
    captions_from_questions,
    content_identity,
    load_easy_vqa,
    load_image_dataset,
    read_image_dir,
)
from schemas.errors import ConfigError


def test_answers_give_colour_and_shape() -> None:
    triples = [
        ["what shape does the image contain?", "triangle", 0],
        ["what is the color of the shape?", "black", 0],
        ["is there a red shape in the image?", "no", 0],
    ]
    assert captions_from_questions(triples) == {0: "a black triangle"}


def test_questions_that_take_a_colour_or_shape_as_given_count() -> None:
    # easy-vqa asks "what color is the triangle?" only of a triangle, "what is the black shape?"
    # only of a black one.
    assert captions_from_questions([["what color is the triangle?", "black", 1]]) == {1: "a black triangle"}
    assert captions_from_questions([["what is the brown shape?", "rectangle", 3]]) == {3: "a brown rectangle"}


@pytest.mark.parametrize(
    ("question", "answer", "fact"),
    [
        ("is there a circle?", "yes", "circle"),
        ("does the image contain a triangle?", "yes", "triangle"),
        ("is there not a rectangle?", "no", "rectangle"),
        ("is no circle present?", "no", "circle"),
        ("is a rectangle present?", "yes", "rectangle"),
    ],
)
def test_affirmed_yes_no_questions_settle_a_shape(question: str, answer: str, fact: str) -> None:
    triples = [[question, answer, 7], ["what color is the shape?", "red", 7]]
    assert captions_from_questions(triples) == {7: f"a red {fact}"}


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("is there a circle?", "no"),
        ("is there not a circle?", "yes"),
        ("is no circle present?", "yes"),
        ("does the image not contain a circle?", "yes"),
    ],
)
def test_one_denial_settles_nothing(question: str, answer: str) -> None:
    triples = [[question, answer, 2], ["what color is the shape?", "red", 2]]
    assert captions_from_questions(triples) == {}


def test_the_one_shape_not_denied_is_the_shape() -> None:
    triples = [
        ["is there a circle?", "no", 4],
        ["is no triangle present?", "yes", 4],
        ["what color is the shape?", "gray", 4],
    ]
    assert captions_from_questions(triples) == {4: "a gray rectangle"}
    colours = [[f"is there a {c} shape?", "no", 5] for c in ("red", "green", "blue", "black", "gray", "teal")]
    colours.append(["what shape is present?", "circle", 5])
    assert captions_from_questions(colours) == {}  # brown or yellow: still open
    colours.append(["is a brown shape present?", "no", 5])
    assert captions_from_questions(colours) == {5: "a yellow circle"}


def test_a_colour_both_affirmed_and_denied_leaves_the_image_out() -> None:
    triples = [
        ["is there a red shape?", "yes", 6],
        ["is no red shape present?", "yes", 6],
        ["what shape is present?", "circle", 6],
    ]
    assert captions_from_questions(triples) == {}


def test_a_yes_on_a_colour_question_settles_the_colour() -> None:
    triples = [["is there a yellow shape in the image?", "yes", 15], ["is there a circle?", "yes", 15]]
    assert captions_from_questions(triples) == {15: "a yellow circle"}


def test_images_with_only_one_of_the_two_or_conflicting_facts_are_left_out() -> None:
    triples = [
        ["is there a circle?", "yes", 22],  # shape only
        ["what color is the shape?", "red", 23],  # colour only
        ["what shape is present?", "circle", 24],
        ["what shape is in the image?", "triangle", 24],  # two shapes: contradictory
        ["what color is the shape?", "red", 24],
    ]
    assert captions_from_questions(triples) == {}


def test_image_ids_may_come_as_strings() -> None:
    assert captions_from_questions([["what is the red shape?", "circle", "5"]]) == {5: "a red circle"}


def test_easy_vqa_splits_as_the_package_ships_them() -> None:
    train, test = load_easy_vqa("train"), load_easy_vqa("test")
    # Settled by the questions: 3,578 and 888 (a parser that reads answers alone finds 3,132 and 772).
    assert (len(train.items), len(test.items)) == (3578, 888)
    assert (len(train.items) + train.skipped, len(test.items) + test.skipped) == (4000, 1000)
    assert len(train.captions) == len(test.captions) == 24
    assert "a red circle" in train.captions
    assert train.identity.startswith("easy-vqa==") and train.identity.endswith(":train")
    assert {i.id for i in train.items}.isdisjoint(i.id for i in test.items)
    assert all(i.path.is_file() and i.path.suffix == ".png" for i in train.items[:20])


def test_easy_vqa_refuses_an_unknown_split() -> None:
    with pytest.raises(ConfigError, match="train and test"):
        load_easy_vqa("validation")


def _image(path: Path, colour: str, caption: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_a_directory_reads_images_with_sidecar_captions(tmp_path: Path) -> None:
    _image(tmp_path / "b.png", "red", "  a red\nsquare ")
    _image(tmp_path / "a.jpg", "blue", "a blue square")
    _image(tmp_path / "sub" / "c.webp", "green", "a green square")
    _image(tmp_path / "no_caption.png", "black", None)
    _image(tmp_path / "empty.gif", "black", "   ")
    (tmp_path / "notes.txt").write_text("not an image's caption")
    items, skipped = read_image_dir(tmp_path)
    assert [(i.id, i.caption) for i in items] == [
        ("a.jpg", "a blue square"),
        ("b.png", "a red square"),  # whitespace collapsed
        ("sub/c.webp", "a green square"),
    ]
    assert skipped == 2


def test_a_directory_with_train_and_test_has_those_splits(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "1.png", "red", "red")
    _image(tmp_path / "train" / "2.png", "blue", "blue")
    _image(tmp_path / "test" / "3.png", "red", "red")
    train = load_image_dataset(str(tmp_path), "train")
    test = load_image_dataset(str(tmp_path), "test")
    assert [i.id for i in train.items] == ["1.png", "2.png"] and [i.id for i in test.items] == ["3.png"]
    assert train.identity != test.identity and train.source == str(tmp_path.resolve())
    with pytest.raises(ConfigError, match="train and test"):
        load_image_dataset(str(tmp_path), "all")


def test_a_flat_directory_is_every_split(tmp_path: Path) -> None:
    _image(tmp_path / "1.png", "red", "red")
    assert load_image_dataset(str(tmp_path), "train").items == load_image_dataset(str(tmp_path), "test").items


def test_identity_follows_content_and_cut(tmp_path: Path) -> None:
    _image(tmp_path / "1.png", "red", "red")
    _image(tmp_path / "2.png", "blue", "blue")
    whole = load_image_dataset(str(tmp_path), "train")
    cut = load_image_dataset(str(tmp_path), "train", limit=1)
    assert len(cut.items) == 1 and cut.identity == f"{whole.identity}[:1]" and cut.limit == 1
    before = content_identity(whole.items)
    _image(tmp_path / "2.png", "green", "blue")  # same name and caption, other pixels
    assert content_identity(read_image_dir(tmp_path)[0]) != before


def test_missing_or_empty_datasets_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither"):
        load_image_dataset(str(tmp_path / "missing"), "train")
    with pytest.raises(ConfigError, match="no captioned image"):
        load_image_dataset(str(tmp_path), "train")
