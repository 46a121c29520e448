"""The output contract every segmentation backend keeps, checked for each backend on one
batch of images of several sizes: a portrait photo, a landscape crop, a thin strip and a
single pixel.

The torchvision case runs the shipped model; the detectron2 cases run small random models
saved with detectron2's checkpointer (tests/handlers/conftest.py) and skip without
detectron2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from handlers.base import RGBImage, Segmentation, StageError
from handlers.segmentation import SegmentationBackend, Segmenter, load_segmenter
from handlers.training import ccp

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SEGMENTER = REPO_ROOT / "models" / "segmenter"


@dataclass(frozen=True)
class Case:
    backend: SegmentationBackend
    folder_fixture: str | None
    """The fixture giving the model folder; None for the shipped one."""
    gives_masks: bool


CASES = [
    pytest.param(Case(SegmentationBackend.TORCHVISION, None, True), id="torchvision"),
    pytest.param(
        Case(SegmentationBackend.DETECTRON2, "detectron2_mask_rcnn_dir", True),
        id="detectron2-mask-rcnn",
        marks=pytest.mark.detectron2,
    ),
    pytest.param(
        Case(SegmentationBackend.DETECTRON2, "detectron2_retinanet_dir", False),
        id="detectron2-retinanet",
        marks=pytest.mark.detectron2,
    ),
]


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    return chosen


@pytest.fixture(scope="module")
def segmenter(case: Case, request: pytest.FixtureRequest) -> Segmenter:
    if case.folder_fixture is None:
        return load_segmenter(case.backend, SHIPPED_SEGMENTER, device="cpu", score_threshold=0.05)
    folder: Path = request.getfixturevalue(case.folder_fixture)
    return load_segmenter(case.backend, folder, device="cpu")


@pytest.fixture(scope="module")
def images(datasets: Path) -> list[RGBImage]:
    photo = ccp.load_photo(datasets / "ccp", 84)
    return [
        photo,
        np.ascontiguousarray(photo[100:400, 0:400]),
        np.ascontiguousarray(photo[300:302]),
        np.full((1, 1, 3), 128, dtype=np.uint8),
    ]


@pytest.fixture(scope="module")
def results(segmenter: Segmenter, images: list[RGBImage]) -> list[Segmentation]:
    return segmenter.segment(images)


def test_there_is_one_result_per_image(results: list[Segmentation], images: list[RGBImage]) -> None:
    assert len(results) == len(images)


def test_some_instances_are_found(results: list[Segmentation]) -> None:
    assert sum(result.num_masks for result in results) > 0


def test_masks_have_the_image_size_or_are_absent_for_a_detector(
    results: list[Segmentation], images: list[RGBImage], case: Case
) -> None:
    for result, image in zip(results, images, strict=True):
        if not case.gives_masks:
            assert result.pred_masks is None
            continue
        assert result.pred_masks is not None
        assert result.pred_masks.dtype == np.bool_
        assert result.pred_masks.shape == (result.num_masks, *image.shape[:2])


def test_scores_are_float32_sorted_highest_first(results: list[Segmentation]) -> None:
    for result in results:
        assert result.mask_scores.dtype == np.float32
        assert result.mask_scores.shape == (result.num_masks,)
        assert np.all(np.diff(result.mask_scores) <= 0)


def test_boxes_are_float32_inside_the_image(
    results: list[Segmentation], images: list[RGBImage]
) -> None:
    for result, image in zip(results, images, strict=True):
        height, width = image.shape[:2]
        boxes = result.pred_boxes

        assert boxes.dtype == np.float32
        assert boxes.shape == (result.num_masks, 4)
        assert np.all(boxes >= 0)
        assert np.all(boxes[:, [0, 2]] <= width) and np.all(boxes[:, [1, 3]] <= height)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])


def test_classes_are_the_segmenters_own(results: list[Segmentation], segmenter: Segmenter) -> None:
    for result in results:
        assert len(result.pred_classes) == result.num_masks
        assert set(result.pred_classes) <= set(segmenter.classes)


def test_an_empty_batch_gives_no_results(segmenter: Segmenter) -> None:
    assert segmenter.segment([]) == []


def test_a_greyscale_image_is_refused(segmenter: Segmenter) -> None:
    grey = np.zeros((64, 48), dtype=np.uint8)

    with pytest.raises(StageError, match=r"\(H, W, 3\) uint8 RGB"):
        segmenter.segment([grey])
