"""`riverbed eval images` and `riverbed bench images` end to end on a small cut of easy-vqa test:
the real broker, pipeline, app and a LiT image model (the session's ``image_model``)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cluster.bench.images import bench_images
from cluster.eval.images_served import SHEET_HITS, SHEET_QUERIES, eval_images
from cluster.image_datasets import load_image_dataset
from schemas.settings import Settings, load_settings
from tests.integration.conftest import ImageModel

N_IMAGES = 72


def with_model(settings: Settings, image_model: ImageModel) -> Settings:
    dump = settings.model_dump(mode="json")
    dump["images"].update(image_model.images)
    return load_settings(overrides=dump)


def test_served_scores_match_the_model_scored_directly(settings, ray_session, image_model, tmp_path):
    settings = with_model(settings, image_model)
    report = eval_images(settings, "easy-vqa", "test", N_IMAGES, tmp_path)
    served, direct = report["served"], report["model_direct"]
    assert report["images"] == served["images"] == N_IMAGES
    assert served["captions"] == report["captions"] and served["chance_accuracy"] == pytest.approx(
        1 / report["captions"]
    )
    # Two computations of each score: over HTTP from the app's hits (vectors through the pipeline
    # and the shards) and from the model in this process. Only ties may differ.
    for name in ("caption_accuracy", "text_to_image_p@10", "text_to_image_r@10"):
        assert served[name] == pytest.approx(direct[name], abs=0.03), name
    # image -> image: the app leaves the image itself out; the model-direct score does too
    assert served["image_to_image_p@10"] == pytest.approx(direct["image_to_image_p@10"], abs=0.05)
    assert served["caption_accuracy"] > 5 * served["chance_accuracy"]

    written = json.loads((tmp_path / "images-eval-easy-vqa-test.json").read_text())
    assert written["served"] == served and (tmp_path / "images-eval-easy-vqa-test.md").is_file()
    rows = report["contact_sheet"]["queries"]
    captions = set(load_image_dataset("easy-vqa", "test", limit=N_IMAGES).captions)
    sheet_queries = [query for query, caption in SHEET_QUERIES if caption in captions]
    assert len(sheet_queries) >= 3, "the cut has the captions the sheet shows"
    assert [r["query"] for r in rows] == sheet_queries
    assert all(len(r["captions"]) == SHEET_HITS for r in rows)
    with Image.open(tmp_path / "images-contact-sheet-easy-vqa-test.png") as sheet:
        assert sheet.height > 96 * len(rows) and sheet.width > 96 * SHEET_HITS


def test_bench_images_counts_every_image_through_the_pipeline(settings, ray_session, image_model, tmp_path):
    settings = with_model(settings, image_model)
    result = bench_images(settings, "easy-vqa", "test", N_IMAGES, tmp_path, runs=1)
    assert result["images"] == N_IMAGES
    assert result["pipeline_images"] == N_IMAGES, "the pipeline's own count of embedded images"
    (run,) = result["runs"]
    assert run["embedder_images"] == N_IMAGES, "the image embedder's own count, over the timed run"
    assert 0 < run["embedder_busy"] <= 1 and run["embedder_calls"] >= 1
    assert run["raw_before_images_per_s"] > 0 and run["raw_after_images_per_s"] > 0
    assert result["raw_images_per_s"] > 0 and result["pipeline_images_per_s"] > 0
    assert result["training_epochs"] > 0 and result["training_s_per_epoch"] > 0, "the model's own record"
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"images.{suffix}").is_file()
