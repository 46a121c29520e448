"""The segmentation stage: garment instances (masks, boxes, classes) in product photos.

Backends are chosen by name and imported only when chosen, so that a worker running the
torchvision backend never imports detectron2, and the reverse.

Every backend keeps one contract: one `Segmentation` per input image, masks at the
image's own size, scores sorted highest first, boxes clipped inside the image.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ValidationError

from handlers.base import ModelLoadError, RGBImage, Segmentation
from schemas.settings import SegmentationBackend as SegmentationBackend

DEFAULT_BACKEND = SegmentationBackend.TORCHVISION

# Module per backend; each defines `load(model_dir, *, device, score_threshold) -> Segmenter`.
_BACKEND_MODULES: dict[SegmentationBackend, str] = {
    SegmentationBackend.TORCHVISION: "handlers.torchvision_backend",
    SegmentationBackend.DETECTRON2: "handlers.detectron2_backend",
}


@runtime_checkable
class Segmenter(Protocol):
    """A loaded instance-segmentation model, ready for inference."""

    model_version: str
    classes: list[str]
    score_threshold: float
    """Instances scoring below this are dropped."""

    def segment(self, images: Sequence[RGBImage]) -> list[Segmentation]:
        """One `Segmentation` per image, in order; the batch runs as one forward pass."""
        ...


class _BackendModule(Protocol):
    def load(
        self, model_dir: Path, *, device: str | None, score_threshold: float | None
    ) -> Segmenter: ...


def load_segmenter(
    backend: SegmentationBackend,
    model_dir: Path,
    *,
    device: str | None = None,
    score_threshold: float | None = None,
) -> Segmenter:
    """Load the model folder `model_dir` with `backend`.

    `device` defaults to CUDA when available, else CPU. `score_threshold` overrides the
    folder's own; instances scoring below it are dropped.
    """
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], received {score_threshold!r}")
    if not model_dir.is_dir():
        raise ModelLoadError(f"segmentation model folder {model_dir} does not exist")

    module: _BackendModule = importlib.import_module(_BACKEND_MODULES[backend])
    return module.load(model_dir, device=device, score_threshold=score_threshold)


def resolve_device(device: str | None) -> torch.device:
    """The device asked for, or CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_segmentation(
    pred_masks: npt.NDArray[np.bool_] | None,
    mask_scores: npt.NDArray[np.floating],
    pred_boxes: npt.NDArray[np.floating],
    pred_classes: Sequence[str],
    image_size: tuple[int, int],
) -> Segmentation:
    """A `Segmentation` that keeps the stage's contract, whatever the backend gave.

    image_size is (H, W); pred_masks (N, H, W) bool or None; mask_scores (N,); pred_boxes
    (N, 4) xyxy pixels. Instances are sorted by score, highest first, boxes clipped to the
    image.
    """
    height, width = image_size
    if pred_masks is not None and pred_masks.shape[1:] != (height, width):
        raise ValueError(
            f"masks of size {pred_masks.shape[1:]} do not match the image's {(height, width)}"
        )

    order = np.argsort(-np.asarray(mask_scores, dtype=np.float32), kind="stable")
    boxes = np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)[order]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0.0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0.0, height)
    return Segmentation(
        pred_masks=None if pred_masks is None else pred_masks[order].astype(bool, copy=False),
        mask_scores=np.asarray(mask_scores, dtype=np.float32)[order],
        pred_boxes=boxes,
        pred_classes=[pred_classes[i] for i in order],
    )


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def read_folder_config(
    model_dir: Path, file_name: str, model: type[ConfigT], backend: str
) -> ConfigT:
    """A backend's model-folder configuration, validated; any problem is a ModelLoadError."""
    path = model_dir / file_name
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError as error:
        raise ModelLoadError(f"{path} is missing; a {backend} model folder needs it") from error
    except ValidationError as error:
        raise ModelLoadError(f"{path} is not a valid {backend} folder config: {error}") from error
