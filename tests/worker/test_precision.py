"""Mixed precision against float32 on the same photos, per stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from handlers.base import Stage
from schemas.settings import get_settings
from worker.batching import precision
from worker.bench_stages import bench_products
from worker.cli import app
from worker.models import Models, load_models
from worker.precision import compare_precision, holds
from worker.stores.images import decode_image


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    yield load_models(get_settings().models)


@pytest.fixture(scope="module")
def photos(datasets: Path) -> tuple[list[Any], list[str]]:
    products = bench_products(datasets, 6)
    pixels = [
        decode_image(str(p.photo), p.photo.read_bytes(), max_pixels=40_000_000).pixels
        for p in products
    ]
    return pixels, [product.text for product in products]


def test_the_same_precision_on_both_sides_agrees_exactly_and_every_stage_holds(
    models: Models, photos: tuple[list[Any], list[str]]
) -> None:
    pixels, texts = photos

    report = compare_precision(models, pixels, texts, contextlib.nullcontext)

    stages = report["stages"]
    assert report["full_precision_stages"] == []
    assert stages["segmentation"]["photos_with_instances"] > 0
    assert stages["segmentation"]["top_class_agreement"] == 1.0
    assert stages["segmentation"]["top_mask_iou_median"] == 1.0
    assert stages["tagging"]["score_max_diff"] == 0.0
    assert stages["tagging"]["label_agreement"] == 1.0
    assert stages["embedding"]["min_cosine"] >= 0.99999


def test_bfloat16_autocast_on_cpu_is_measured_and_judged_per_stage(
    models: Models, photos: tuple[list[Any], list[str]]
) -> None:
    pixels, texts = photos
    cpu = torch.device("cpu")

    report = compare_precision(
        models, pixels, texts, lambda: precision(cpu, mixed=True, cpu_dtype=torch.bfloat16)
    )

    stages = report["stages"]
    assert stages["tagging"]["score_max_diff"] > 0.0, "the second pass ran in bfloat16"
    assert stages["embedding"]["min_cosine"] > 0.99
    assert report["full_precision_stages"] == [
        stage for stage, figures in stages.items() if not figures["holds"]
    ]


def test_a_stage_past_one_tolerance_does_not_hold_and_one_with_nothing_to_measure_does() -> None:
    moved = {"score_max_diff": 0.05, "label_agreement": 1.0, "image_embedding_min_cosine": 1.0}
    empty = {"top_class_agreement": None, "top_mask_iou_median": None}

    assert not holds(Stage.TAGGING, moved)
    assert holds(Stage.SEGMENTATION, empty)
    assert not holds(Stage.EMBEDDING, {"min_cosine": 0.99})


def test_the_check_on_a_cpu_without_a_dtype_says_mixed_precision_is_for_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENRICH_MODELS__DEVICE", "cpu")
    get_settings.cache_clear()

    result = CliRunner().invoke(app, ["bench", "precision"])
    get_settings.cache_clear()

    assert result.exit_code == 2
    assert "CUDA only" in result.output and "--cpu-dtype bfloat16" in result.output


def test_the_worker_keeps_a_listed_stage_float32_under_mixed_precision() -> None:
    settings = get_settings().batch.model_copy(
        update={"mixed_precision": True, "full_precision_stages": [Stage.SEGMENTATION]}
    )

    assert not settings.mixed_for(Stage.SEGMENTATION)
    assert settings.mixed_for(Stage.TAGGING)
    assert not settings.model_copy(update={"mixed_precision": False}).mixed_for(Stage.TAGGING)
