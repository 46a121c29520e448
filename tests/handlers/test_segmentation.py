"""The contract every segmentation backend keeps, and the backend registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handlers.base import ModelLoadError, RGBImage, Segmentation, StageError
from handlers.segmentation import (
    SegmentationBackend,
    Segmenter,
    load_segmenter,
    make_segmentation,
)
from handlers.training import ccp

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SEGMENTER = REPO_ROOT / "models" / "segmenter"
DETECTRON2_MISSING = "detectron2 is not on PyPI; build it from source to run its backend's tests"


def _detectron2_folder(folder: Path) -> Path:
    """A Mask R-CNN folder for the detectron2 backend: a model-zoo config with random
    weights, small enough for the CPU. Needs detectron2."""
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.INPUT.MIN_SIZE_TEST = 256
    cfg.INPUT.MAX_SIZE_TEST = 448
    (folder / "config.yaml").write_text(cfg.dump())
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model")
    (folder / "detectron2.json").write_text(
        '{"name": "random-maskrcnn", "config": "config.yaml", "weights": "model.pth", '
        '"classes": ["jeans", "skirt"], "score_threshold": 0.0}'
    )
    return folder


@pytest.fixture(
    scope="session",
    params=[
        SegmentationBackend.TORCHVISION,
        pytest.param(SegmentationBackend.DETECTRON2, marks=pytest.mark.detectron2),
    ],
)
def segmenter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Segmenter:
    backend: SegmentationBackend = request.param
    if backend is SegmentationBackend.DETECTRON2:
        pytest.importorskip("detectron2", reason=DETECTRON2_MISSING)
        folder = _detectron2_folder(tmp_path_factory.mktemp("detectron2"))
        return load_segmenter(backend, folder, device="cpu")
    return load_segmenter(backend, SHIPPED_SEGMENTER, device="cpu", score_threshold=0.05)


@pytest.fixture(scope="session")
def photos(datasets: Path) -> list[RGBImage]:
    """Two photos of different sizes: a CCP street photo, and a crop of it."""
    photo = ccp.load_photo(datasets / "ccp", 84)
    return [photo, np.ascontiguousarray(photo[100:500, 50:450])]


@pytest.fixture(scope="session")
def results(segmenter: Segmenter, photos: list[RGBImage]) -> list[Segmentation]:
    return segmenter.segment(photos)


def test_there_is_one_result_per_image(results: list[Segmentation], photos: list[RGBImage]) -> None:
    assert len(results) == len(photos)


def test_masks_have_the_image_size(results: list[Segmentation], photos: list[RGBImage]) -> None:
    for result, photo in zip(results, photos, strict=True):
        assert result.pred_masks is not None
        assert result.pred_masks.dtype == np.bool_
        assert result.pred_masks.shape == (result.num_masks, *photo.shape[:2])


def test_scores_are_sorted_highest_first(results: list[Segmentation]) -> None:
    for result in results:
        assert result.mask_scores.dtype == np.float32
        assert np.all(np.diff(result.mask_scores) <= 0)


def test_boxes_lie_inside_the_image(results: list[Segmentation], photos: list[RGBImage]) -> None:
    for result, photo in zip(results, photos, strict=True):
        height, width = photo.shape[:2]
        boxes = result.pred_boxes

        assert boxes.shape == (result.num_masks, 4)
        assert np.all(boxes >= 0)
        assert np.all(boxes[:, [0, 2]] <= width) and np.all(boxes[:, [1, 3]] <= height)
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])


def test_classes_are_the_segmenters_own(results: list[Segmentation], segmenter: Segmenter) -> None:
    for result in results:
        assert set(result.pred_classes) <= set(segmenter.classes)


def test_an_empty_batch_gives_no_results(segmenter: Segmenter) -> None:
    assert segmenter.segment([]) == []


def test_a_greyscale_image_is_refused(segmenter: Segmenter) -> None:
    grey = np.zeros((64, 48), dtype=np.uint8)

    with pytest.raises(StageError, match=r"\(H, W, 3\) uint8 RGB"):
        segmenter.segment([grey])


def test_a_missing_model_folder_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_segmenter(SegmentationBackend.TORCHVISION, tmp_path / "absent")


def test_choosing_detectron2_without_it_says_how_to_install_it(tmp_path: Path) -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("detectron2 is installed")
    (tmp_path / "detectron2.json").write_text(
        '{"name": "d2", "config": "config.yaml", "weights": "model.pth", '
        '"classes": ["jeans"], "score_threshold": 0.5}'
    )

    with pytest.raises(ModelLoadError, match=r"not on PyPI.*install it from source"):
        load_segmenter(SegmentationBackend.DETECTRON2, tmp_path)


def test_the_registry_does_not_import_detectron2() -> None:
    script = (
        "import sys, handlers.segmentation; "
        "assert 'detectron2' not in sys.modules, 'detectron2 imported'; "
        "assert 'handlers.detectron2_backend' not in sys.modules, 'backend imported'"
    )

    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True
    )

    assert completed.returncode == 0, completed.stderr


def test_make_segmentation_sorts_by_score_and_clips_boxes() -> None:
    masks = np.zeros((2, 10, 20), dtype=bool)
    masks[1, 0, 0] = True

    result = make_segmentation(
        pred_masks=masks,
        mask_scores=np.array([0.2, 0.9]),
        pred_boxes=np.array([[-5.0, 1.0, 30.0, 4.0], [1.0, 2.0, 3.0, 12.0]]),
        pred_classes=["skirt", "jeans"],
        image_size=(10, 20),
    )

    assert result.pred_classes == ["jeans", "skirt"]
    assert result.mask_scores.tolist() == pytest.approx([0.9, 0.2])
    assert result.pred_masks is not None and result.pred_masks[0, 0, 0]
    assert result.pred_boxes.tolist() == [[1.0, 2.0, 3.0, 10.0], [0.0, 1.0, 20.0, 4.0]]


def test_make_segmentation_refuses_masks_of_another_size() -> None:
    with pytest.raises(ValueError, match="do not match"):
        make_segmentation(
            pred_masks=np.zeros((1, 5, 5), dtype=bool),
            mask_scores=np.array([0.5]),
            pred_boxes=np.zeros((1, 4)),
            pred_classes=["jeans"],
            image_size=(10, 10),
        )


def test_a_one_pixel_image_gets_masks_of_its_own_size(segmenter: Segmenter) -> None:
    tiny = np.full((1, 1, 3), 128, dtype=np.uint8)

    (result,) = segmenter.segment([tiny])

    assert result.pred_masks is None or result.pred_masks.shape[1:] == (1, 1)
    assert len(result.mask_scores) == result.num_masks
