"""The backend registry and `make_segmentation`; the contract every backend keeps is in
test_segmentation_contract.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from handlers.base import ModelLoadError
from handlers.segmentation import (
    SegmentationBackend,
    load_segmenter,
    make_segmentation,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
