"""Segmentation backend: any detectron2 model (Mask R-CNN, or a detector without masks).

detectron2 is not on PyPI. This module imports it only inside `load`, so that importing
the module, or choosing the torchvision backend, never needs it.

A model folder holds `detectron2.json` (`Detectron2SegmenterConfig`):

- `config`: a YAML file in the folder, or else a model-zoo name such as
  `COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`;
- `weights`: the checkpoint file in the folder, read by `DetectionCheckpointer`;
- `classes`: the names of the model's classes, in the order of its class indices;
- `score_threshold`: instances scoring less are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field

from handlers.base import ModelLoadError, RGBImage, Segmentation, Stage, StageError, model_version
from handlers.segmentation import make_segmentation, read_folder_config, resolve_device

log = structlog.get_logger(__name__)

CONFIG_FILE = "detectron2.json"

INSTALL_HINT = (
    "detectron2 is not installed, and it is not on PyPI: install it from source after torch, "
    "with `pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'` (needs a C++ compiler, and "
    "the CUDA toolkit for GPU builds; see "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html), "
    "or choose the torchvision backend"
)

_INPUT_FORMATS = ("RGB", "BGR")


class Detectron2SegmenterConfig(BaseModel):
    """`detectron2.json` of a detectron2 model folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    backend: Literal["detectron2"] = "detectron2"
    config: str
    weights: str
    classes: list[str] = Field(min_length=1)
    score_threshold: float = Field(ge=0.0, le=1.0)


class Detectron2Segmenter:
    """A loaded detectron2 model in eval mode; see `handlers.segmentation.Segmenter`."""

    def __init__(
        self,
        model: torch.nn.Module,
        resize: Any,
        *,
        input_format: str,
        classes: list[str],
        score_threshold: float,
        model_version: str,
    ) -> None:
        self.model_version = model_version
        self.classes = classes
        self.score_threshold = score_threshold
        self._model = model
        self._resize = resize
        self._input_format = input_format

    def segment(self, images: Sequence[RGBImage]) -> list[Segmentation]:
        """One `Segmentation` per (H, W, 3) uint8 RGB image, from one forward pass."""
        if not images:
            return []
        inputs = [self._to_input(image) for image in images]

        with torch.no_grad():
            outputs: list[dict[str, Any]] = self._model(inputs)

        return [
            self._to_segmentation(output["instances"], (image.shape[0], image.shape[1]))
            for output, image in zip(outputs, images, strict=True)
        ]

    def _to_input(self, image: RGBImage) -> dict[str, Any]:
        """detectron2's input dict: the image resized by the config's rules, (3, h, w) float32
        in the config's channel order, and the size to give the outputs at."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise StageError(
                Stage.SEGMENTATION,
                f"image must be (H, W, 3) uint8 RGB, received {image.shape} {image.dtype}",
            )
        pixels = image[:, :, ::-1] if self._input_format == "BGR" else image
        resized = self._resize.get_transform(pixels).apply_image(pixels)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}

    def _to_segmentation(self, instances: Any, image_size: tuple[int, int]) -> Segmentation:
        instances = instances.to("cpu")
        masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
        return make_segmentation(
            pred_masks=None if masks is None else masks.astype(bool),
            mask_scores=instances.scores.numpy(),
            pred_boxes=instances.pred_boxes.tensor.numpy(),
            pred_classes=[self.classes[int(i)] for i in instances.pred_classes],
            image_size=image_size,
        )


def load(
    model_dir: Path, *, device: str | None = None, score_threshold: float | None = None
) -> Detectron2Segmenter:
    """Build the configured model, load its checkpoint, switch to eval."""
    started = time.perf_counter()
    config = read_config(model_dir)
    threshold = config.score_threshold if score_threshold is None else score_threshold
    d2 = _import_detectron2()
    cfg = _detectron2_cfg(d2, model_dir, config, threshold, resolve_device(device))

    model = d2.modeling.build_model(cfg)
    d2.checkpoint.DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    resize = d2.transforms.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )

    version = model_version(config.name, model_dir)
    log.info(
        "model_loaded",
        stage=Stage.SEGMENTATION,
        backend="detectron2",
        model_version=version,
        device=cfg.MODEL.DEVICE,
        seconds=round(time.perf_counter() - started, 3),
    )
    return Detectron2Segmenter(
        model,
        resize,
        input_format=cfg.INPUT.FORMAT,
        classes=list(config.classes),
        score_threshold=threshold,
        model_version=version,
    )


def read_config(model_dir: Path) -> Detectron2SegmenterConfig:
    return read_folder_config(model_dir, CONFIG_FILE, Detectron2SegmenterConfig, "detectron2")


class _Detectron2:
    """The detectron2 modules this backend uses, imported together."""

    def __init__(self) -> None:
        import detectron2.checkpoint
        import detectron2.config
        import detectron2.data.transforms
        import detectron2.model_zoo
        import detectron2.modeling

        self.checkpoint = detectron2.checkpoint
        self.config = detectron2.config
        self.transforms = detectron2.data.transforms
        self.model_zoo = detectron2.model_zoo
        self.modeling = detectron2.modeling


def _import_detectron2() -> _Detectron2:
    try:
        return _Detectron2()
    except ImportError as error:
        raise ModelLoadError(INSTALL_HINT) from error


def _detectron2_cfg(
    d2: _Detectron2,
    model_dir: Path,
    config: Detectron2SegmenterConfig,
    score_threshold: float,
    device: torch.device,
) -> Any:
    """detectron2's CfgNode from the folder's YAML or model-zoo config, set for inference."""
    cfg = d2.config.get_cfg()
    cfg.merge_from_file(_config_file(d2, model_dir, config.config))
    weights = model_dir / config.weights
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights} is missing")

    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = str(device)
    # R-CNNs read ROI_HEADS, RetinaNet its own: set both, whichever the config builds.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_threshold
    if cfg.INPUT.FORMAT not in _INPUT_FORMATS:
        raise ModelLoadError(
            f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not supported; allowed: {_INPUT_FORMATS}"
        )
    _check_classes(cfg, config.classes)
    cfg.freeze()
    return cfg


def _config_file(d2: _Detectron2, model_dir: Path, name: str) -> str:
    """A YAML file in the model folder, or else the model zoo's file of that name."""
    local = model_dir / name
    if local.is_file():
        return str(local)
    try:
        return str(d2.model_zoo.get_config_file(name))
    except RuntimeError as error:
        raise ModelLoadError(
            f"detectron2 config {name!r} is neither a file in {model_dir} "
            "nor a detectron2 model-zoo config name"
        ) from error


def _check_classes(cfg: Any, classes: Sequence[str]) -> None:
    """The folder's class names must match the head's class count."""
    architecture = cfg.MODEL.META_ARCHITECTURE
    expected = (
        cfg.MODEL.RETINANET.NUM_CLASSES
        if architecture == "RetinaNet"
        else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    )
    if expected != len(classes):
        raise ModelLoadError(
            f"the {architecture} config has {expected} classes, "
            f"but {CONFIG_FILE} names {len(classes)}"
        )
