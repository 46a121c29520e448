from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.base import ModelLoadError
from handlers.segmentation import SegmentationBackend, load_segmenter
from handlers.torchvision_backend import (
    CONFIG_FILE,
    TorchvisionSegmenter,
    TorchvisionSegmenterConfig,
    build_model,
    save_weights,
)
from handlers.training import ccp

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SEGMENTER = REPO_ROOT / "models" / "segmenter"
PHOTO_OF_JEANS = 84
"""A validation photo (id divisible by 7): a person in blue jeans, full length."""
JEANS = 25
MIN_JEANS_IOU = 0.5
"""The shipped model reaches 0.87 on this photo; MODEL_CARD.md has the whole split."""


@pytest.fixture(scope="module")
def shipped() -> TorchvisionSegmenter:
    segmenter = load_segmenter(SegmentationBackend.TORCHVISION, SHIPPED_SEGMENTER, device="cpu")
    assert isinstance(segmenter, TorchvisionSegmenter)
    return segmenter


def test_the_shipped_segmenter_finds_the_jeans_in_a_validation_photo(
    shipped: TorchvisionSegmenter, datasets: Path
) -> None:
    root = datasets / "ccp"
    photo = ccp.load_photo(root, PHOTO_OF_JEANS)
    truth = ccp.load_pixel_mask(root, PHOTO_OF_JEANS) == JEANS

    (result,) = shipped.segment([photo])

    assert result.pred_masks is not None
    trousers = [name in ("jeans", "pants") for name in result.pred_classes]
    predicted = result.pred_masks[trousers].any(axis=0)
    iou = float((predicted & truth).sum() / (predicted | truth).sum())
    print(f"jeans IoU on photo {PHOTO_OF_JEANS}: {iou:.3f}, classes {result.pred_classes}")
    assert iou > MIN_JEANS_IOU


def test_the_shipped_model_folder_is_at_most_30_mb() -> None:
    size = sum(path.stat().st_size for path in SHIPPED_SEGMENTER.rglob("*") if path.is_file())

    assert size <= 30 * 2**20


def test_the_shipped_folder_has_config_weights_and_card() -> None:
    config = TorchvisionSegmenterConfig.model_validate_json(
        (SHIPPED_SEGMENTER / CONFIG_FILE).read_bytes()
    )

    assert (SHIPPED_SEGMENTER / config.weights).is_file()
    assert (SHIPPED_SEGMENTER / "MODEL_CARD.md").is_file()
    assert "jeans" in config.classes


def test_a_score_threshold_override_drops_lower_scores(datasets: Path) -> None:
    photo = ccp.load_photo(datasets / "ccp", PHOTO_OF_JEANS)
    strict = load_segmenter(
        SegmentationBackend.TORCHVISION, SHIPPED_SEGMENTER, device="cpu", score_threshold=0.9
    )

    (result,) = strict.segment([photo])

    assert np.all(result.mask_scores >= 0.9)


def _write_folder(folder: Path, model: torch.nn.Module, classes: list[str]) -> None:
    config = TorchvisionSegmenterConfig(
        name="tiny", classes=classes, min_size=64, max_size=96, score_threshold=0.0
    )
    save_weights(model, folder / config.weights)
    (folder / CONFIG_FILE).write_text(config.model_dump_json())


def test_a_saved_folder_loads_the_same_weights_in_half_precision(tmp_path: Path) -> None:
    model = build_model(2)
    _write_folder(tmp_path, model, ["jeans", "skirt"])

    loaded = load_segmenter(SegmentationBackend.TORCHVISION, tmp_path, device="cpu")

    assert loaded.classes == ["jeans", "skirt"]
    assert isinstance(loaded, TorchvisionSegmenter)
    for name, tensor in loaded._model.state_dict().items():
        expected = model.state_dict()[name]
        assert torch.allclose(tensor, expected.half().float()), name


def test_weights_for_another_class_count_cannot_load(tmp_path: Path) -> None:
    _write_folder(tmp_path, build_model(3), ["jeans", "skirt"])

    with pytest.raises(ModelLoadError, match="does not fit the configured network"):
        load_segmenter(SegmentationBackend.TORCHVISION, tmp_path, device="cpu")


def test_a_folder_without_config_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config.json is missing"):
        load_segmenter(SegmentationBackend.TORCHVISION, tmp_path, device="cpu")
