"""The detectron2 backend, against a detectron2 built from source: small random models saved
with detectron2's checkpointer (tests/handlers/conftest.py), loaded back through the backend.

Tests marked `detectron2` skip where detectron2 cannot be imported; the folder-config checks
at the end run without it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from handlers.base import ModelLoadError, RGBImage
from handlers.detectron2_backend import Detectron2Segmenter, read_config
from handlers.segmentation import SegmentationBackend, load_segmenter
from tests.handlers.conftest import (
    CLASSES,
    FASTER_RCNN_ZOO,
    MASK_RCNN_ZOO,
    MAX_SIZE_TEST,
    MIN_SIZE_TEST,
    TINY_RCNN,
    detectron2_model_cfg,
    save_detectron2_model,
    write_folder_config,
)

needs_detectron2 = pytest.mark.detectron2


def _load(folder: Path, **overrides: Any) -> Detectron2Segmenter:
    segmenter = load_segmenter(SegmentationBackend.DETECTRON2, folder, device="cpu", **overrides)
    assert isinstance(segmenter, Detectron2Segmenter)
    return segmenter


@contextmanager
def _model_calls(segmenter: Detectron2Segmenter) -> Iterator[list[list[dict[str, Any]]]]:
    """The input lists the model's forward is called with, while the block runs."""
    calls: list[list[dict[str, Any]]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        calls.append(args[0])

    handle = segmenter._model.register_forward_pre_hook(record)
    try:
        yield calls
    finally:
        handle.remove()


def _copy_folder(source: Path, target: Path, **fields: Any) -> Path:
    """The model folder `source` with its checkpoint and YAML, and its own detectron2.json."""
    target.mkdir()
    for name in ("model.pth", "config.yaml"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    config = read_config(source).model_dump()
    return write_folder_config(target, **{**config, **fields})


def _photo_colours(height: int, width: int) -> RGBImage:
    """An image of one colour: red 200, green 100, blue 0."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :] = (200, 100, 0)
    return image


@pytest.fixture(scope="module")
def mask_rcnn(detectron2_mask_rcnn_dir: Path) -> Detectron2Segmenter:
    return _load(detectron2_mask_rcnn_dir)


@needs_detectron2
def test_a_mask_rcnn_saved_by_detectrons_checkpointer_loads_its_weights(
    detectron2_mask_rcnn_dir: Path, mask_rcnn: Detectron2Segmenter
) -> None:
    saved = torch.load(detectron2_mask_rcnn_dir / "model.pth", weights_only=True)["model"]

    loaded = mask_rcnn._model.state_dict()

    assert saved.keys() <= loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    assert not mask_rcnn._model.training
    assert mask_rcnn.classes == CLASSES
    assert mask_rcnn.model_version.startswith("random-mask-rcnn@")


@needs_detectron2
def test_a_batch_goes_through_the_model_in_one_forward_pass(
    mask_rcnn: Detectron2Segmenter,
) -> None:
    images = [_photo_colours(90, 60), _photo_colours(40, 160), _photo_colours(5, 5)]

    with _model_calls(mask_rcnn) as calls:
        results = mask_rcnn.segment(images)

    assert len(calls) == 1
    assert [(item["height"], item["width"]) for item in calls[0]] == [(90, 60), (40, 160), (5, 5)]
    assert [r.pred_masks.shape[1:] for r in results if r.pred_masks is not None] == [
        (90, 60),
        (40, 160),
        (5, 5),
    ]


@needs_detectron2
@pytest.mark.parametrize(
    ("size", "resized"),
    [
        ((300, 200), (96, MIN_SIZE_TEST)),
        ((100, 400), (28, MAX_SIZE_TEST)),
        ((1, 1), (MIN_SIZE_TEST, MIN_SIZE_TEST)),
        ((1, 1000), (1, MAX_SIZE_TEST)),
    ],
    ids=["portrait", "landscape-over-max", "one-pixel", "thin-strip"],
)
def test_images_are_resized_by_the_configs_test_sizes(
    mask_rcnn: Detectron2Segmenter, size: tuple[int, int], resized: tuple[int, int]
) -> None:
    (model_input,) = mask_rcnn.model_inputs([_photo_colours(*size)])

    assert model_input["image"].shape == (3, *resized)
    assert model_input["image"].dtype == torch.float32
    assert (model_input["height"], model_input["width"]) == size


@needs_detectron2
def test_a_thin_strip_gets_masks_of_its_own_size(mask_rcnn: Detectron2Segmenter) -> None:
    strip = np.full((1, 1000, 3), 90, dtype=np.uint8)

    (result,) = mask_rcnn.segment([strip])

    assert result.pred_masks is not None
    assert result.pred_masks.shape == (result.num_masks, 1, 1000)


@needs_detectron2
@pytest.mark.parametrize(
    ("input_format", "channels"), [("BGR", [0, 100, 200]), ("RGB", [200, 100, 0])]
)
def test_the_model_sees_the_channels_in_its_configs_input_format(
    detectron2_mask_rcnn_dir: Path,
    tmp_path: Path,
    input_format: str,
    channels: list[int],
) -> None:
    folder = _copy_folder(
        detectron2_mask_rcnn_dir, tmp_path / "model", options={"INPUT.FORMAT": input_format}
    )
    segmenter = _load(folder)

    with _model_calls(segmenter) as calls:
        segmenter.segment([_photo_colours(20, 30)])

    seen = calls[0][0]["image"]
    assert seen[:, 0, 0].tolist() == channels
    assert segmenter.model_inputs([_photo_colours(20, 30)])[0]["image"][:, 5, 5].tolist() == (
        channels
    )


@needs_detectron2
@pytest.mark.parametrize(
    "folder_fixture", ["detectron2_faster_rcnn_dir", "detectron2_retinanet_dir"]
)
def test_a_detection_only_model_gives_boxes_and_no_masks(
    folder_fixture: str, request: pytest.FixtureRequest
) -> None:
    segmenter = _load(request.getfixturevalue(folder_fixture))

    results = segmenter.segment([_photo_colours(80, 120), _photo_colours(50, 50)])

    assert all(result.pred_masks is None for result in results)
    assert sum(result.num_masks for result in results) > 0
    for result in results:
        assert result.pred_boxes.shape == (result.num_masks, 4)


@needs_detectron2
def test_a_model_zoo_name_with_options_loads_without_a_yaml_in_the_folder(
    detectron2_faster_rcnn_dir: Path,
) -> None:
    segmenter = _load(detectron2_faster_rcnn_dir)

    assert not (detectron2_faster_rcnn_dir / "config.yaml").exists()
    assert read_config(detectron2_faster_rcnn_dir).config == FASTER_RCNN_ZOO
    assert segmenter.classes == CLASSES


@needs_detectron2
def test_the_workers_score_threshold_overrides_the_folders(
    detectron2_mask_rcnn_dir: Path, mask_rcnn: Detectron2Segmenter
) -> None:
    images = [_photo_colours(60, 60)]
    strict = _load(detectron2_mask_rcnn_dir, score_threshold=1.0)

    (kept,) = mask_rcnn.segment(images)
    (dropped,) = strict.segment(images)

    assert kept.num_masks > 0
    assert dropped.num_masks == 0
    assert strict.score_threshold == 1.0


@needs_detectron2
def test_the_workers_device_setting_places_the_model(mask_rcnn: Detectron2Segmenter) -> None:
    devices = {parameter.device for parameter in mask_rcnn._model.parameters()}

    assert devices == {torch.device("cpu")}


@needs_detectron2
def test_class_names_must_match_the_heads_class_count(
    detectron2_mask_rcnn_dir: Path, tmp_path: Path
) -> None:
    folder = _copy_folder(detectron2_mask_rcnn_dir, tmp_path / "m", classes=["a", "b", "c"])

    with pytest.raises(ModelLoadError, match=r"NUM_CLASSES = 2, but .* names 3 classes"):
        _load(folder)


@needs_detectron2
def test_weights_for_another_class_count_cannot_load(
    detectron2_mask_rcnn_dir: Path, tmp_path: Path
) -> None:
    folder = _copy_folder(
        detectron2_mask_rcnn_dir,
        tmp_path / "m",
        classes=["a", "b", "c"],
        options={"MODEL.ROI_HEADS.NUM_CLASSES": 3},
    )

    with pytest.raises(ModelLoadError, match=r"does not fit the configured model.*cls_score"):
        _load(folder)


@needs_detectron2
def test_a_checkpoint_with_extra_keys_loads_with_a_warning(
    detectron2_mask_rcnn_dir: Path, tmp_path: Path
) -> None:
    folder = _copy_folder(detectron2_mask_rcnn_dir, tmp_path / "m")
    checkpoint = torch.load(folder / "model.pth", weights_only=True)
    checkpoint["model"]["unused.weight"] = torch.zeros(3)
    torch.save(checkpoint, folder / "model.pth")

    with capture_logs() as logs:
        _load(folder)

    (warning,) = [entry for entry in logs if entry["event"] == "checkpoint_keys_unused"]
    assert warning["log_level"] == "warning"
    assert warning["keys"] == ["unused.weight"]


@needs_detectron2
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"config": "COCO-Nope/mask_rcnn.yaml"}, "neither a file in .* nor a detectron2 model-zoo"),
        ({"config": "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"}, "not a YAML file"),
        ({"options": {"MODEL.NO_SUCH_KEY": 1}}, r"`options` of .*NO_SUCH_KEY"),
        ({"options": {"INPUT.FORMAT": "L"}}, r"INPUT.FORMAT 'L' .* allowed: RGB, BGR"),
        (
            {"options": {"MODEL.META_ARCHITECTURE": "SemanticSegmentor"}},
            "gives no instances; allowed: GeneralizedRCNN",
        ),
        ({"options": {"MODEL.ROI_HEADS.NAME": "NoSuchHeads"}}, "cannot build .*NoSuchHeads"),
        ({"weights": "absent.pth"}, "weights file .*absent.pth is missing"),
        ({"weights": "../model.pth"}, "must name a file inside"),
    ],
    ids=[
        "unknown-zoo-name",
        "lazyconfig",
        "unknown-option",
        "greyscale-format",
        "semantic-only",
        "unknown-head",
        "no-weights",
        "weights-outside",
    ],
)
def test_a_folder_that_cannot_load_says_why(
    detectron2_mask_rcnn_dir: Path, tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    folder = _copy_folder(detectron2_mask_rcnn_dir, tmp_path / "m", **fields)

    with pytest.raises(ModelLoadError, match=message):
        _load(folder)


@needs_detectron2
def test_a_corrupt_checkpoint_cannot_load(detectron2_mask_rcnn_dir: Path, tmp_path: Path) -> None:
    folder = _copy_folder(detectron2_mask_rcnn_dir, tmp_path / "m")
    (folder / "model.pth").write_bytes(b"not a checkpoint")

    with pytest.raises(ModelLoadError, match="not a readable detectron2 checkpoint"):
        _load(folder)


@needs_detectron2
def test_a_zoo_config_without_the_options_it_was_trained_with_cannot_load(
    tmp_path: Path,
) -> None:
    save_detectron2_model(detectron2_model_cfg(MASK_RCNN_ZOO, TINY_RCNN), tmp_path)
    write_folder_config(tmp_path, config=MASK_RCNN_ZOO, classes=[f"c{i}" for i in range(80)])

    with pytest.raises(ModelLoadError, match="does not fit the configured model"):
        _load(tmp_path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"options": {"MODEL.DEVICE": "cuda"}}, "MODEL.DEVICE is set by the backend"),
        (
            {"options": {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.9}},
            "set `score_threshold` instead",
        ),
        ({"weights": "https://dl.fbaipublicfiles.com/m.pkl"}, "not a URL"),
        ({"classes": []}, "classes"),
    ],
    ids=["device-option", "threshold-option", "weights-url", "no-classes"],
)
def test_a_folder_config_is_checked_before_detectron2_is_needed(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    write_folder_config(tmp_path, config="config.yaml", **fields)

    with pytest.raises(ModelLoadError, match=message):
        load_segmenter(SegmentationBackend.DETECTRON2, tmp_path, device="cpu")
