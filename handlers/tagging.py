"""The tagging stage: multi-label garment and accessory labels for product photos.

A tagger is a folder (models/tagger/) with two files:

- `export.pkl`, a fastai `Learner.export()`: the model and the learner's own transforms;
- `tagger.json`, a `TaggerConfig`: the name, the labels in the model's output order, one
  threshold per label, and the fastai, torch and python versions at export.
"""

from __future__ import annotations

import pickle
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastai
import numpy as np
import numpy.typing as npt
import structlog
import torch
from fastai.learner import Learner, load_learner
from pydantic import BaseModel, Field, ValidationError, model_validator

from handlers.base import Label, ModelLoadError, RGBImage, Stage, StageError, Tags, model_version

log = structlog.get_logger(__name__)

EXPORT_FILE = "export.pkl"
CONFIG_FILE = "tagger.json"


class ExportVersions(BaseModel):
    """Library versions the learner was exported with; unpickling needs compatible ones."""

    fastai: str
    torch: str
    python: str

    @classmethod
    def installed(cls) -> ExportVersions:
        return cls(
            fastai=fastai.__version__,
            torch=torch.__version__,
            python=platform.python_version(),
        )


class TaggerConfig(BaseModel):
    """tagger.json: labels in the model's output order and a threshold for each label."""

    name: str = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    thresholds: dict[str, float]
    image_size: int = Field(gt=0)
    versions: ExportVersions

    @model_validator(mode="after")
    def _one_threshold_per_label(self) -> TaggerConfig:
        if set(self.thresholds) != set(self.labels):
            missing = sorted(set(self.labels) - set(self.thresholds))
            unknown = sorted(set(self.thresholds) - set(self.labels))
            raise ValueError(f"thresholds must name each label once: {missing=} {unknown=}")
        out_of_range = {k: v for k, v in self.thresholds.items() if not 0.0 < v < 1.0}
        if out_of_range:
            raise ValueError(f"thresholds must lie between 0 and 1, got {out_of_range}")
        return self

    @classmethod
    def read(cls, path: Path) -> TaggerConfig:
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as error:
            raise ModelLoadError(f"cannot read tagger config {path}: {error}") from error

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


class Tagger:
    """A fastai multi-label learner with per-label thresholds, loaded from a model folder."""

    def __init__(self, *, model_dir: Path, device: str | None = None) -> None:
        started = time.perf_counter()

        self.config = TaggerConfig.read(model_dir / CONFIG_FILE)
        _warn_on_version_mismatch(self.config.versions)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._learner = _load_learner(model_dir / EXPORT_FILE, self.device)
        _check_labels(self._learner, self.config.labels, model_dir)

        self.labels = self.config.labels
        self.thresholds = self.config.thresholds
        self.model_version = model_version(self.config.name, model_dir)
        # D of the image embeddings `tag_and_embed` returns.
        self.feature_dimension = _feature_dimension(self._learner, self.device)
        log.info(
            "model_loaded",
            stage=Stage.TAGGING,
            model_version=self.model_version,
            num_labels=len(self.labels),
            device=str(self.device),
            seconds=round(time.perf_counter() - started, 3),
        )

    def tag(self, images: Sequence[RGBImage]) -> list[Tags]:
        """One `Tags` per image: labels above their thresholds, highest score first."""
        scores = self.predict_scores(images)
        return [self._tags(row) for row in scores]

    def predict_scores(self, images: Sequence[RGBImage]) -> npt.NDArray[np.float32]:
        """Sigmoid scores (B, L) float32, columns in the order of `labels`, in one forward pass."""
        scores, _ = self.predict_scores_and_features(images)
        return scores

    def tag_and_embed(
        self, images: Sequence[RGBImage]
    ) -> tuple[list[Tags], npt.NDArray[np.float32]]:
        """`tag(images)` and each image's pooled backbone features, from one forward pass.

        The features (B, D) float32 are the backbone's last feature map averaged over space
        (D = 1280 for EfficientNet-Lite0), scaled to unit length: an image embedding.
        """
        scores, features = self.predict_scores_and_features(images)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        embeddings = (features / np.maximum(norms, 1e-12)).astype(np.float32)
        return [self._tags(row) for row in scores], embeddings

    def predict_scores_and_features(
        self, images: Sequence[RGBImage]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Sigmoid scores (B, L) float32 and average-pooled body features (B, D) float32.

        The fastai model is body then head; the body runs once and feeds both.
        """
        _check_images(images)
        if not images:
            return (
                np.zeros((0, len(self.labels)), dtype=np.float32),
                np.zeros((0, self.feature_dimension), dtype=np.float32),
            )

        started = time.perf_counter()
        loader = self._learner.dls.test_dl(list(images), bs=len(images), num_workers=0)
        (batch,) = loader.one_batch()
        body, head = self._learner.model[0], self._learner.model[1]
        with torch.inference_mode():
            feature_map = body(batch)
            logits = head(feature_map)
            pooled = feature_map.float().mean(dim=(2, 3))
        scores = torch.sigmoid(logits).float().cpu().numpy()
        features = pooled.cpu().numpy().astype(np.float32)

        log.debug(
            "images_tagged",
            stage=Stage.TAGGING,
            num_images=len(images),
            seconds=round(time.perf_counter() - started, 3),
        )
        return scores, features

    def _tags(self, scores: npt.NDArray[np.float32]) -> Tags:
        by_label = {label: float(score) for label, score in zip(self.labels, scores, strict=True)}
        kept = [
            Label(label, score)
            for label, score in by_label.items()
            if score > self.thresholds[label]
        ]
        return Tags(labels=sorted(kept, key=lambda kept_label: -kept_label.score), scores=by_label)


class _ExplainingUnpickler(pickle.Unpickler):
    """Names the class or function an export refers to when this process cannot find it."""

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        try:
            return super().find_class(module_name, global_name)
        except (ImportError, AttributeError) as error:
            raise ModelLoadError(_missing_global_message(module_name, global_name)) from error


# torch.load takes a module-like object with `Unpickler`, `load` and `__name__`.
_EXPLAINING_PICKLE = SimpleNamespace(
    __name__="explaining_pickle", Unpickler=_ExplainingUnpickler, load=pickle.load
)


def _load_learner(path: Path, device: torch.device) -> Learner:
    if not path.is_file():
        raise ModelLoadError(
            f"tagger export {path} is missing; a tagger folder holds {EXPORT_FILE} "
            f"(fastai Learner.export) and {CONFIG_FILE}"
        )

    # Workaround: load_learner swallows most ImportErrors and then fails on an unbound name
    # (fastai/fastai#4115); _ExplainingUnpickler raises before fastai can hide the cause.
    try:
        learner = load_learner(path, cpu=device.type == "cpu", pickle_module=_EXPLAINING_PICKLE)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot unpickle tagger export {path}: {type(error).__name__}: {error}"
        ) from error

    learner.dls.to(device)
    learner.model.to(device).eval()
    return learner


def _missing_global_message(module_name: str, global_name: str) -> str:
    where = (
        "a notebook's or script's __main__, which only existed in the exporting process"
        if module_name == "__main__"
        else f"module {module_name!r}, which this process cannot import or which lacks it"
    )
    return (
        f"the tagger export refers to function or class {global_name!r} from {where}. "
        "Functions and classes a fastai export refers to (get_x, get_y, splitters, "
        "transforms) must live in an importable module such as handlers.training.tagger, "
        "not in a notebook's __main__; move it there, train or export again"
    )


def _warn_on_version_mismatch(exported: ExportVersions) -> None:
    installed = ExportVersions.installed()
    for package in ("fastai", "torch"):
        exported_version = getattr(exported, package)
        installed_version = getattr(installed, package)
        if _release(exported_version) != _release(installed_version):
            log.warning(
                "model_version_mismatch",
                stage=Stage.TAGGING,
                package=package,
                exported_version=exported_version,
                installed_version=installed_version,
            )


def _release(version: str) -> str:
    """The public version without a local build tag: `2.14.1+cu130` gives `2.14.1`."""
    return version.split("+", 1)[0]


def _check_labels(learner: Learner, labels: list[str], model_dir: Path) -> None:
    vocab = [str(label) for label in learner.dls.vocab]
    if vocab != labels:
        raise ModelLoadError(
            f"{model_dir / CONFIG_FILE} lists labels {labels}, but the exported learner "
            f"predicts {vocab}; the two files come from different trainings"
        )


def _feature_dimension(learner: Learner, device: torch.device) -> int:
    """Channels of the body's last feature map, read from one forward pass of a blank image."""
    with torch.inference_mode():
        feature_map = learner.model[0](torch.zeros((1, 3, 64, 64), device=device))
    return int(feature_map.shape[1])


def _check_images(images: Sequence[RGBImage]) -> None:
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise StageError(
                Stage.TAGGING, f"image {index} has shape {shape}; expected (H, W, 3) RGB"
            )
        if image.dtype != np.uint8:
            raise StageError(
                Stage.TAGGING, f"image {index} has dtype {image.dtype}; expected uint8"
            )
