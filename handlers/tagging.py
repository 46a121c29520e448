"""The tagging stage: multi-label garment and accessory labels for product photos.

A tagger is a folder (models/tagger/) with two files:

- `export.pkl`, a fastai `Learner.export()`: the model and the learner's own transforms;
- `tagger.json`, a `TaggerConfig`: the name, the labels in the model's output order, one
  threshold per label (and how they were calibrated), the fastai, torch and python versions
  at export, and the modules that hold the learner's own functions.

An export refers to its custom functions and classes (get_y, label functions, losses,
metrics) by module and name. Those modules must be importable in the worker; names that a
notebook or script exported from its `__main__` are looked up in `function_modules`.
"""

from __future__ import annotations

import importlib
import pickle
import platform
import time
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Annotated, Any

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
MODULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


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


class F1Figures(BaseModel):
    micro_f1: float
    macro_f1: float


class LabelCalibration(BaseModel):
    """One label's calibrated threshold and its F1 on the calibration photos."""

    threshold: float
    best_threshold: float | None = Field(
        description="The best-F1 threshold before shrinkage; None when the label had too "
        "few positives or F1 0 everywhere, and kept the default."
    )
    support: int = Field(description="Calibration photos that carry the label.")
    default_f1: float = Field(description="F1 at the default threshold.")
    f1: float = Field(description="F1 at `threshold`, on the photos it was chosen on.")
    held_out_f1: float = Field(description="F1 at thresholds chosen on the other half.")


class ThresholdCalibration(BaseModel):
    """How `thresholds` were chosen: per label, the best F1 on a grid over validation photos,
    drawn towards the default by `shrinkage` pseudo-photos.

    `after` is measured on the photos the thresholds were chosen on, so it is optimistic;
    `held_out` chooses thresholds on one half of those photos and scores the other half,
    both ways round, and pools the predictions.
    """

    photos: str
    num_images: int
    default_threshold: float
    floor: float
    grid_step: float
    min_support: int
    shrinkage: float
    before: F1Figures
    after: F1Figures
    held_out: F1Figures
    labels: dict[str, LabelCalibration]


class TaggerConfig(BaseModel):
    """tagger.json: labels in the model's output order and a threshold for each label."""

    name: str = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    thresholds: dict[str, float]
    image_size: int = Field(gt=0)
    versions: ExportVersions
    function_modules: list[Annotated[str, Field(pattern=MODULE_NAME_PATTERN)]] = Field(
        default_factory=list,
        description="Modules imported before unpickling that hold the learner's own functions "
        "and classes; names pickled from __main__ are looked up in them, in this order.",
    )
    calibration: ThresholdCalibration | None = None

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
        self._learner = load_tagger_learner(model_dir, self.config, self.device)
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


def load_tagger_learner(model_dir: Path, config: TaggerConfig, device: torch.device) -> Learner:
    path = model_dir / EXPORT_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"tagger export {path} is missing; a tagger folder holds {EXPORT_FILE} "
            f"(fastai Learner.export) and {CONFIG_FILE}"
        )
    modules = _import_function_modules(config.function_modules, model_dir / CONFIG_FILE)

    # Workaround: load_learner swallows most ImportErrors and then fails on an unbound name
    # (fastai/fastai#4115); the explaining Unpickler raises before fastai can hide the cause.
    pickle_module = _explaining_pickle(modules, model_dir / CONFIG_FILE, config.versions)
    try:
        learner = load_learner(path, cpu=device.type == "cpu", pickle_module=pickle_module)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"cannot unpickle tagger export {path}: {type(error).__name__}: {error}; "
            f"{_versions_note(config.versions)}"
        ) from error

    learner.dls.to(device)
    learner.model.to(device).eval()
    return learner


def _import_function_modules(names: Sequence[str], config_path: Path) -> list[ModuleType]:
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        # Importing runs the module's code, which can raise anything.
        except Exception as error:
            raise ModelLoadError(
                f"{config_path} lists {name!r} in function_modules, but this process cannot "
                f"import it ({type(error).__name__}: {error}); install it in the worker's "
                "environment or put its folder on PYTHONPATH"
            ) from error
    return modules


BYTECODE_REBUILDERS = {("cloudpickle.cloudpickle", "_make_function")}
"""What cloudpickle calls to rebuild a function from the bytecode an export holds."""


def _explaining_pickle(
    function_modules: Sequence[ModuleType], config_path: Path, exported: ExportVersions
) -> Any:
    """A pickle module for torch.load whose Unpickler finds `__main__` names in
    `function_modules`, names any function or class it cannot find, and refuses functions
    copied as bytecode of another Python release, which would crash the process when run.

    torch.load takes any object with `Unpickler`, `load` and `__name__`.
    """
    exported_python = _release("python", exported.python)
    installed_python = _release("python", platform.python_version())

    class Unpickler(pickle.Unpickler):
        def find_class(self, module_name: str, global_name: str, /) -> Any:
            rebuilds_bytecode = (module_name, global_name) in BYTECODE_REBUILDERS
            if rebuilds_bytecode and exported_python != installed_python:
                raise ModelLoadError(
                    f"the tagger export beside {config_path} holds functions as bytecode of "
                    f"Python {exported_python}, which Python {installed_python} cannot run; "
                    f"export it again under Python {exported_python} with `enrich train "
                    f"tagger --reexport --out {config_path.parent}`, which writes them by name"
                )
            if module_name == "__main__":
                found = _find_in_modules(global_name, function_modules)
                if found is not None:
                    return found
            try:
                return super().find_class(module_name, global_name)
            except (ImportError, AttributeError) as error:
                message = _missing_global_message(
                    module_name, global_name, [m.__name__ for m in function_modules], config_path
                )
                raise ModelLoadError(message) from error

    return SimpleNamespace(__name__="explaining_pickle", Unpickler=Unpickler, load=pickle.load)


def _find_in_modules(qualified_name: str, modules: Sequence[ModuleType]) -> Any | None:
    """The first module's attribute of that dotted name, or None when none has it."""
    for module in modules:
        try:
            return reduce(getattr, qualified_name.split("."), module)
        except AttributeError:
            continue
    return None


def _missing_global_message(
    module_name: str, global_name: str, function_modules: Sequence[str], config_path: Path
) -> str:
    if module_name == "__main__":
        where = (
            "in __main__, the notebook or script that exported the learner, which only "
            "existed in that process"
        )
        if function_modules:
            where += f", and in function_modules {list(function_modules)}"
    else:
        where = f"in module {module_name!r}, which this process cannot import or which lacks it"
    return (
        f"the tagger export refers to function or class {global_name!r}, looked up {where}. "
        "The functions and classes a fastai export refers to (get_x, get_y, label functions, "
        "losses, metrics, splitters, transforms) must live in a module that the worker can "
        f"import and that function_modules in {config_path} lists (names from __main__ are "
        f"looked up there); put {global_name!r} in such a module, or export again from one, "
        "as handlers.training.tagger does"
    )


def _warn_on_version_mismatch(exported: ExportVersions) -> None:
    installed = ExportVersions.installed()
    for package in ("fastai", "torch", "python"):
        exported_version = getattr(exported, package)
        installed_version = getattr(installed, package)
        if _release(package, exported_version) != _release(package, installed_version):
            log.warning(
                "model_version_mismatch",
                stage=Stage.TAGGING,
                package=package,
                exported_version=exported_version,
                installed_version=installed_version,
            )


def _release(package: str, version: str) -> str:
    """The part of a version that matters to unpickling.

    fastai and torch: the public version without a local build tag (`2.14.1+cu130` gives
    `2.14.1`). Python: major.minor, which decides the bytecode of functions pickled by value.
    """
    public = version.split("+", 1)[0]
    return ".".join(public.split(".")[:2]) if package == "python" else public


def _versions_note(exported: ExportVersions) -> str:
    installed = ExportVersions.installed()
    return (
        f"it was exported with fastai {exported.fastai}, torch {exported.torch}, python "
        f"{exported.python}, and this process has fastai {installed.fastai}, torch "
        f"{installed.torch}, python {installed.python}"
    )


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
