"""Segmentation backend: any detectron2 model (Mask R-CNN, or a detector without masks).

detectron2 is not on PyPI. This module imports it only inside `load`, so that importing
the module, or choosing the torchvision backend, never needs it.

A model folder holds `detectron2.json` (`Detectron2SegmenterConfig`):

- `config`: a YAML file in the folder (as detectron2's training writes it with
  `cfg.dump()`), or else a model-zoo name such as
  `COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml`;
- `options`: config keys to override, as detectron2's `--opts` would, e.g.
  `{"MODEL.ROI_HEADS.NUM_CLASSES": 8}` for a zoo config fine-tuned on 8 classes;
- `weights`: the checkpoint file in the folder (`.pth` or `.pkl`), read by
  `DetectionCheckpointer`; never a URL;
- `classes`: the names of the model's classes, in the order of its class indices;
- `score_threshold`: instances scoring less are dropped.

Images go in as detectron2's own predictor feeds them: in the config's `INPUT.FORMAT`
(RGB or BGR), resized by `INPUT.MIN_SIZE_TEST` / `INPUT.MAX_SIZE_TEST`, and the batch as
one list of input dicts in one forward pass. A config without a mask head (Faster R-CNN,
RetinaNet) gives boxes with `pred_masks` None.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from handlers.base import ModelLoadError, RGBImage, Segmentation, Stage, StageError, model_version
from handlers.segmentation import make_segmentation, read_folder_config, resolve_device

log = structlog.get_logger(__name__)

CONFIG_FILE = "detectron2.json"

INSTALL_HINT = (
    "detectron2 is not installed, and it is not on PyPI: install it from source after torch, "
    "with `pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'` (needs setuptools<81, a C++ "
    "compiler, and the CUDA toolkit for GPU builds; see "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html), "
    "or choose the torchvision backend"
)

_INPUT_FORMATS = ("RGB", "BGR")
# The meta-architectures whose outputs hold "instances".
_ARCHITECTURES = ("GeneralizedRCNN", "RetinaNet", "PanopticFPN")

# Config keys this backend sets itself, and where to set them instead.
_OWNED_KEYS = {
    "MODEL.WEIGHTS": "`weights`",
    "MODEL.DEVICE": "ENRICH_MODELS__DEVICE",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "`score_threshold`",
    "MODEL.RETINANET.SCORE_THRESH_TEST": "`score_threshold`",
}

Resize = Callable[[RGBImage], RGBImage]


class Detectron2SegmenterConfig(BaseModel):
    """`detectron2.json` of a detectron2 model folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    backend: Literal["detectron2"] = "detectron2"
    config: str
    options: dict[str, JsonValue] = Field(default_factory=dict)
    weights: str
    classes: list[str] = Field(min_length=1)
    score_threshold: float = Field(ge=0.0, le=1.0)

    @field_validator("options")
    @classmethod
    def _options_leave_owned_keys_alone(cls, options: dict[str, JsonValue]) -> dict[str, JsonValue]:
        for key in options:
            if key in _OWNED_KEYS:
                raise ValueError(f"{key} is set by the backend; set {_OWNED_KEYS[key]} instead")
        return options

    @field_validator("weights")
    @classmethod
    def _weights_is_a_local_file(cls, weights: str) -> str:
        if "://" in weights:
            raise ValueError(f"weights must name a file in the folder, not a URL: {weights[:80]!r}")
        return weights


class Detectron2Segmenter:
    """A loaded detectron2 model in eval mode; see `handlers.segmentation.Segmenter`."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        resize: Resize,
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
        inputs = self.model_inputs(images)

        with torch.no_grad():
            outputs: list[dict[str, Any]] = self._model(inputs)

        return [
            self._to_segmentation(output["instances"], (image.shape[0], image.shape[1]))
            for output, image in zip(outputs, images, strict=True)
        ]

    def model_inputs(self, images: Sequence[RGBImage]) -> list[dict[str, Any]]:
        """detectron2's input dicts, one per image: "image" (3, h, w) float32 in the config's
        channel order at the config's test size, "height" and "width" the image's own size,
        at which the model gives its outputs."""
        return [self._to_input(image) for image in images]

    def _to_input(self, image: RGBImage) -> dict[str, Any]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise StageError(
                Stage.SEGMENTATION,
                f"image must be (H, W, 3) uint8 RGB, received {image.shape} {image.dtype}",
            )
        pixels = np.ascontiguousarray(image[:, :, ::-1]) if self._input_format == "BGR" else image

        resized = self._resize(pixels)

        tensor = torch.as_tensor(resized.astype(np.float32).transpose(2, 0, 1))
        return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}

    def _to_segmentation(self, instances: Any, image_size: tuple[int, int]) -> Segmentation:
        instances = instances.to("cpu")
        masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
        return make_segmentation(
            pred_masks=None if masks is None else masks.astype(bool),
            mask_scores=instances.scores.float().numpy(),
            pred_boxes=instances.pred_boxes.tensor.float().numpy(),
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

    model = _build_model(d2, cfg)
    _load_weights(d2, model, Path(cfg.MODEL.WEIGHTS))
    model.eval()

    version = model_version(config.name, model_dir)
    log.info(
        "model_loaded",
        stage=Stage.SEGMENTATION,
        backend="detectron2",
        model_version=version,
        architecture=cfg.MODEL.META_ARCHITECTURE,
        device=cfg.MODEL.DEVICE,
        seconds=round(time.perf_counter() - started, 3),
    )
    return Detectron2Segmenter(
        model,
        resize=_test_resize(d2, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST),
        input_format=cfg.INPUT.FORMAT,
        classes=list(config.classes),
        score_threshold=threshold,
        model_version=version,
    )


def read_config(model_dir: Path) -> Detectron2SegmenterConfig:
    return read_folder_config(model_dir, CONFIG_FILE, Detectron2SegmenterConfig, "detectron2")


class _Detectron2:
    """The detectron2 modules this backend uses, imported together.

    Not `detectron2.model_zoo`: it imports `pkg_resources`, which setuptools 81 removed
    (facebookresearch/detectron2#5494); `model_zoo_dir` finds the zoo's YAML files, which
    ship inside the package, without it.
    """

    def __init__(self) -> None:
        import detectron2
        import detectron2.checkpoint
        import detectron2.config
        import detectron2.data.transforms
        import detectron2.modeling
        import yaml  # type: ignore[import-untyped]

        self.checkpoint = detectron2.checkpoint
        self.config = detectron2.config
        self.transforms = detectron2.data.transforms
        self.modeling = detectron2.modeling
        self.model_zoo_dir = Path(detectron2.__file__).parent / "model_zoo" / "configs"
        self.yaml_error: type[Exception] = yaml.YAMLError


def _import_detectron2() -> _Detectron2:
    try:
        return _Detectron2()
    except ImportError as error:
        raise ModelLoadError(f"{INSTALL_HINT} ({error})") from error


def _detectron2_cfg(
    d2: _Detectron2,
    model_dir: Path,
    config: Detectron2SegmenterConfig,
    score_threshold: float,
    device: torch.device,
) -> Any:
    """detectron2's frozen CfgNode from the folder's YAML or model-zoo config and its
    options, set for inference with the folder's weights on `device`."""
    cfg = d2.config.get_cfg()
    config_file = _config_file(d2, model_dir, config.config)
    config_errors = (OSError, KeyError, ValueError, AssertionError, d2.yaml_error)
    try:
        cfg.merge_from_file(str(config_file))
    except config_errors as error:
        raise ModelLoadError(f"detectron2 config {config_file} cannot be read: {error}") from error
    try:
        cfg.merge_from_list([item for pair in config.options.items() for item in pair])
    except config_errors as error:
        raise ModelLoadError(f"`options` of {model_dir / CONFIG_FILE}: {error}") from error

    cfg.MODEL.WEIGHTS = str(_weights_file(model_dir, config.weights))
    cfg.MODEL.DEVICE = str(device)
    # R-CNNs read ROI_HEADS, RetinaNet its own: set both, whichever the config builds.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_threshold
    if cfg.INPUT.FORMAT not in _INPUT_FORMATS:
        raise ModelLoadError(
            f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} (from {config_file} and `options`) is not "
            f"supported; allowed: {', '.join(_INPUT_FORMATS)}"
        )
    if cfg.MODEL.META_ARCHITECTURE not in _ARCHITECTURES:
        raise ModelLoadError(
            f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} (from {config_file} and "
            f"`options`) gives no instances; allowed: {', '.join(_ARCHITECTURES)}"
        )
    _check_classes(cfg, config.classes)
    cfg.freeze()
    return cfg


def _config_file(d2: _Detectron2, model_dir: Path, name: str) -> Path:
    """A YAML file in the model folder, or else the model zoo's file of that name."""
    if not name.endswith((".yaml", ".yml")):
        raise ModelLoadError(
            f"detectron2 config {name!r} is not a YAML file; only YAML configs are supported "
            "(not LazyConfig .py files)"
        )
    local = _inside(model_dir, name)
    if local is not None and local.is_file():
        return local
    zoo = _inside(d2.model_zoo_dir, name)
    if zoo is not None and zoo.is_file():
        return zoo

    raise ModelLoadError(
        f"detectron2 config {name!r} is neither a file in {model_dir} "
        "nor a detectron2 model-zoo config name such as "
        "'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml'"
    )


def _weights_file(model_dir: Path, name: str) -> Path:
    """The checkpoint, which must lie in the folder, so that the model version covers it."""
    weights = _inside(model_dir, name)
    if weights is None:
        raise ModelLoadError(f"weights {name!r} must name a file inside {model_dir}")
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights} is missing")
    return weights


def _inside(folder: Path, name: str) -> Path | None:
    """`folder / name`, or None where `name` leads out of `folder`."""
    path = (folder / name).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


def _check_classes(cfg: Any, classes: Sequence[str]) -> None:
    """The folder's class names must match the head's class count."""
    architecture = cfg.MODEL.META_ARCHITECTURE
    head = "RETINANET" if architecture == "RetinaNet" else "ROI_HEADS"
    expected = cfg.MODEL[head].NUM_CLASSES
    key = f"MODEL.{head}.NUM_CLASSES"
    if expected != len(classes):
        raise ModelLoadError(
            f"the {architecture} config has {key} = {expected}, but {CONFIG_FILE} names "
            f"{len(classes)} classes; name them all, or set {key} in `options`"
        )


def _build_model(d2: _Detectron2, cfg: Any) -> torch.nn.Module:
    """The model `cfg` describes, with random weights; a part that detectron2's registries
    do not know (a project's head whose module was not imported) cannot load."""
    try:
        model: torch.nn.Module = d2.modeling.build_model(cfg)
    except (KeyError, AssertionError, ValueError) as error:
        raise ModelLoadError(f"detectron2 cannot build the configured model: {error}") from error
    return model


def _load_weights(d2: _Detectron2, model: torch.nn.Module, weights: Path) -> None:
    """Load the checkpoint into `model`; one that leaves parameters unset, or gives them
    another shape, cannot load (detectron2 itself would only log it)."""

    class Checkpointer(d2.checkpoint.DetectionCheckpointer):  # type: ignore[misc,name-defined]
        incompatible: Any = None

        def _load_model(self, checkpoint: Any) -> Any:
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    checkpointer = Checkpointer(model)
    try:
        checkpointer.load(str(weights))
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as error:
        reason = f"{weights} is not a readable detectron2 checkpoint: {error}"
        raise ModelLoadError(reason) from error

    incompatible = checkpointer.incompatible
    if incompatible.missing_keys or incompatible.incorrect_shapes:
        shapes = [
            f"{key} {tuple(saved)} != {tuple(built)}"
            for key, saved, built in incompatible.incorrect_shapes
        ]
        raise ModelLoadError(
            f"{weights} does not fit the configured model: "
            f"missing {incompatible.missing_keys[:5]}, other shapes {shapes[:5]}"
        )
    if incompatible.unexpected_keys:
        log.warning(
            "checkpoint_keys_unused",
            stage=Stage.SEGMENTATION,
            weights=str(weights),
            count=len(incompatible.unexpected_keys),
            keys=incompatible.unexpected_keys[:5],
        )


def _test_resize(d2: _Detectron2, min_size: int, max_size: int) -> Resize:
    """detectron2's test-time resize: the short side to `min_size`, the long side at most
    `max_size`, bilinear; `min_size` 0 keeps the image as it is."""

    def resize(pixels: RGBImage) -> RGBImage:
        if min_size == 0:
            return pixels
        height, width = pixels.shape[:2]
        new_height, new_width = d2.transforms.ResizeShortestEdge.get_output_shape(
            height, width, min_size, max_size
        )
        # A thin strip can round to no pixel across; keep one, where detectron2 would fail.
        transform = d2.transforms.ResizeTransform(
            height, width, max(new_height, 1), max(new_width, 1), Image.Resampling.BILINEAR
        )
        resized: RGBImage = transform.apply_image(pixels)
        return resized

    return resize
