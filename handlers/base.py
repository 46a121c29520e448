"""What every stage shares: the stage names, the result types and model versions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from schemas.settings import Stage as Stage

RGBImage = npt.NDArray[np.uint8]
"""A decoded photo as displayed (EXIF rotation applied): (H, W, 3) uint8, RGB."""


class StageError(Exception):
    """A stage failed on its input; the enrichment is recorded as failed with this reason."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class ModelLoadError(Exception):
    """A model folder is missing, incomplete or cannot be loaded; the worker cannot start."""


@dataclass(frozen=True)
class Segmentation:
    """Instances found in one image, sorted by score, highest first.

    pred_masks (N, H, W) bool at the image's own size; mask_scores (N,) float32;
    pred_boxes (N, 4) float32 as x0, y0, x1, y1 in pixels, inside the image;
    pred_classes N class names. A detection-only model gives pred_masks None.
    """

    pred_masks: npt.NDArray[np.bool_] | None
    mask_scores: npt.NDArray[np.float32]
    pred_boxes: npt.NDArray[np.float32]
    pred_classes: list[str]

    @property
    def num_masks(self) -> int:
        return len(self.pred_classes)


@dataclass(frozen=True)
class Label:
    label: str
    score: float


@dataclass(frozen=True)
class Tags:
    """Labels above their thresholds, highest score first, and every label's score."""

    labels: list[Label]
    scores: dict[str, float] = field(default_factory=dict)


def model_version(name: str, folder: Path) -> str:
    """Name a model by its name and a hash of its files: `name@0123456789ab`.

    The hash covers every file's relative path and bytes, so that any change to weights,
    configuration or thresholds gives a new version. Documentation (`*.md`, such as the
    model card) is left out: rewording a card must not make the catalog stale.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".md"):
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return f"{name}@{digest.hexdigest()[:12]}"
