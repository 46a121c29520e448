"""Training and evaluation of the garment segmenter (torchvision backend) on CCP.

CCP annotates classes per pixel, not instances. An instance here is a connected region
of one garment class, after regions less than about 32 px apart are merged (the two legs
of a pair of jeans split by a hand stay one instance); regions smaller than a fraction of
the photo are dropped. The same rule makes the ground truth for evaluation.

Run `python -m handlers.training.segmenter train --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
from PIL import Image
from scipy import ndimage
from torch import nn
from torchvision.models.detection import MaskRCNN

from handlers.base import ModelLoadError, Segmentation, model_version
from handlers.evaluation import MaskFigures, MaskScorer, MaskTruth
from handlers.segmentation import (
    SegmentationBackend,
    Segmenter,
    load_segmenter,
    resolve_device,
)
from handlers.torchvision_backend import (
    ARCHITECTURE,
    CONFIG_FILE,
    Architecture,
    TorchvisionSegmenterConfig,
    build_model,
    load_weights,
    read_config,
    save_weights,
)
from handlers.training import ccp

log = structlog.get_logger(__name__)

MODEL_NAME = "garment-segmenter"
DEFAULT_OUT = Path("models/segmenter")

GARMENT_CLASSES: dict[str, tuple[str, ...]] = {
    "jeans": ("jeans",),
    "pants": ("pants", "leggings"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
    "dress": ("dress",),
    "top": ("blouse", "shirt", "t-shirt", "top", "sweater", "sweatshirt", "jumper", "hoodie"),
    "outerwear": ("coat", "jacket", "blazer", "cardigan", "cape"),
    "shoes": (
        "shoes",
        "boots",
        "sandals",
        "heels",
        "loafers",
        "pumps",
        "sneakers",
        "flats",
        "wedges",
        "clogs",
    ),
}
"""Each segmenter class and the CCP classes it gathers. Other CCP classes are background."""

TROUSERS = ("jeans", "pants")

MIN_AREA_FRACTION = 0.001
"""Regions smaller than this fraction of the photo are no instance (about 450 CCP pixels)."""

MERGE_RADIUS = 16
"""Regions of one class closer than about twice this many pixels (in a CCP photo) merge."""

PRODUCT_FOLDERS: dict[str, tuple[str, ...]] = {
    "pants": TROUSERS,
    "shorts": ("shorts",),
    "skirt": ("skirt",),
    "dress": ("dress",),
    "t-shirt": ("top",),
    "shirt": ("top",),
    "longsleeve": ("top",),
    "outwear": ("outerwear",),
    "shoes": ("shoes",),
}
"""Folders of the product-photo set (clothing-small) and the classes that count as found."""

DEFAULT_PRODUCTS_ROOT = Path("../shared/datasets/clothing-small/validation")

AP_SCORE_THRESHOLD = 0.05
"""Load the segmenter with this low threshold for evaluation, so AP sees the whole curve."""

THRESHOLD_SWEEP = (0.3, 0.4, 0.5, 0.6)
"""Score thresholds at which the evaluation also reports the IoUs, to choose one."""

CACHE_SCALE = 1.25
"""Training photos are kept at this multiple of the image size, for scale jitter and crops."""

SCALE_JITTER = (0.8, 0.9, 1.0)

REPEAT_THRESHOLD = 0.5
"""Photos with a class found in fewer than this share of photos are shown more often: up to
sqrt(REPEAT_THRESHOLD / share) times per epoch (repeat-factor sampling, as for LVIS)."""

PRODUCT_CROP_PROBABILITY = 0.1
"""Share of training samples made to look like shop photos: one garment on a plain ground."""


@dataclass(frozen=True)
class TrainingExample:
    """One photo with its instances, resized for training.

    image (h, w, 3) uint8 RGB; instance_map (h, w) uint8, 0 outside instances, k inside
    the k-th; labels (N,) int64 model labels, 1-based (0 is the background).
    """

    image_id: int
    image: npt.NDArray[np.uint8]
    instance_map: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]


# --- Instances -------------------------------------------------------------------------


def class_lookup(
    label_names: Sequence[str], garment_classes: Mapping[str, Sequence[str]]
) -> npt.NDArray[np.int64]:
    """(256,) int64 table from CCP class index to segmenter label (1-based), 0 elsewhere."""
    index = {name: i for i, name in enumerate(label_names)}
    lookup = np.zeros(256, dtype=np.int64)
    for label, (name, members) in enumerate(garment_classes.items(), start=1):
        unknown = [member for member in members if member not in index]
        if unknown:
            raise ValueError(f"class {name!r} gathers {unknown}, which CCP does not have")
        lookup[[index[member] for member in members]] = label
    return lookup


def garment_instances(
    label_map: npt.NDArray[np.int64],
    *,
    min_area: int,
    merge_radius: int = MERGE_RADIUS,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Split a per-pixel map of segmenter labels (H, W), 0 for background, into instances.

    Gives the instance map (H, W) uint8, 0 outside instances and k inside the k-th, and
    the instances' labels (N,) int64.
    """
    instance_map = np.zeros(label_map.shape, dtype=np.uint8)
    labels: list[int] = []
    for label in np.unique(label_map[label_map > 0]):
        for region in _regions(label_map == label, min_area=min_area, merge_radius=merge_radius):
            labels.append(int(label))
            instance_map[region] = len(labels)
    return instance_map, np.asarray(labels, dtype=np.int64)


def ccp_truth(label_map: npt.NDArray[np.int64], classes: Sequence[str]) -> MaskTruth:
    """The ground truth of a photo's map (H, W) of segmenter labels, 1-based in `classes`:
    its instances (`garment_instances`) and every pixel of each class present."""
    instance_map, labels = garment_instances(label_map, min_area=_min_area(label_map.shape))
    return MaskTruth(
        instance_masks=instance_map[None] == np.arange(1, labels.size + 1)[:, None, None],
        instance_classes=[classes[label - 1] for label in labels],
        class_regions={
            name: label_map == label
            for label, name in enumerate(classes, start=1)
            if (label_map == label).any()
        },
    )


def _regions(
    pixels: npt.NDArray[np.bool_], *, min_area: int, merge_radius: int
) -> Iterator[npt.NDArray[np.bool_]]:
    """Masks (H, W) bool of the connected regions of `pixels`, nearby regions merged."""
    grown = ndimage.binary_dilation(pixels, iterations=merge_radius) if merge_radius else pixels
    components, count = ndimage.label(grown)
    components[~pixels] = 0
    areas = np.bincount(components.ravel(), minlength=count + 1)
    for component in range(1, count + 1):
        if areas[component] >= min_area:
            yield components == component


def _min_area(shape: tuple[int, ...]) -> int:
    return max(1, round(MIN_AREA_FRACTION * shape[0] * shape[1]))


# --- Data --------------------------------------------------------------------------------


def load_examples(
    root: Path, image_ids: Sequence[int], *, short_side: int, lookup: npt.NDArray[np.int64]
) -> list[TrainingExample]:
    """Photos and their instances, found at the photo's size, then resized to `short_side`."""
    examples = [_load_example(root, image_id, short_side, lookup) for image_id in image_ids]
    return [example for example in examples if example.labels.size]


def _load_example(
    root: Path, image_id: int, short_side: int, lookup: npt.NDArray[np.int64]
) -> TrainingExample:
    photo = ccp.load_photo(root, image_id)
    label_map = lookup[ccp.load_pixel_mask(root, image_id)]
    instance_map, labels = garment_instances(label_map, min_area=_min_area(label_map.shape))

    scale = short_side / min(photo.shape[:2])
    size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
    image = np.array(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))
    small_map = np.array(Image.fromarray(instance_map).resize(size, Image.Resampling.NEAREST))
    return TrainingExample(image_id, image, small_map, labels)


def make_sample(
    example: TrainingExample, rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An augmented (3, h, w) float image in [0, 1] and its Mask R-CNN target."""
    image, instance_map, labels = example.image, example.instance_map, example.labels
    if rng.random() < PRODUCT_CROP_PROBABILITY:
        image, instance_map, labels = _product_crop(image, instance_map, labels, rng)
    if rng.random() < 0.5:
        image, instance_map = image[:, ::-1], instance_map[:, ::-1]

    masks = instance_map[None] == np.arange(1, labels.size + 1)[:, None, None]
    present = masks.any(axis=(1, 2))
    masks, labels = masks[present], labels[present]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    tensor = _jitter_colour(tensor, rng)
    target = {
        "boxes": _boxes(masks),
        "labels": torch.from_numpy(labels),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }
    return tensor, target


def _product_crop(
    image: npt.NDArray[np.uint8],
    instance_map: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """One large garment alone on a plain light ground, cropped with a margin.

    Shops photograph one item on a plain ground; CCP shows people in the street.
    """
    areas = np.bincount(instance_map.ravel(), minlength=labels.size + 1)[1:]
    candidates = np.flatnonzero(areas >= 0.02 * instance_map.size)
    if candidates.size == 0:
        return image, instance_map, labels
    chosen = int(rng.choice(candidates))

    garment = instance_map == chosen + 1
    rows, columns = np.flatnonzero(garment.any(axis=1)), np.flatnonzero(garment.any(axis=0))
    margin = int(0.15 * max(rows[-1] - rows[0], columns[-1] - columns[0]))
    top, bottom = max(0, rows[0] - margin), min(garment.shape[0], rows[-1] + margin + 1)
    left, right = max(0, columns[0] - margin), min(garment.shape[1], columns[-1] + margin + 1)

    ground = rng.integers(215, 256, size=3, dtype=np.uint8)
    crop = np.where(garment[..., None], image, ground)[top:bottom, left:right]
    return crop, garment[top:bottom, left:right].astype(np.uint8), labels[[chosen]]


def _jitter_colour(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    brightness, contrast = (float(value) for value in rng.uniform(0.8, 1.2, size=2))
    mean = image.mean()
    jittered: torch.Tensor = ((image - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)
    return jittered


def _boxes(masks: npt.NDArray[np.bool_]) -> torch.Tensor:
    """(N, 4) float32 xyxy boxes around (N, H, W) masks, covering whole pixels."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[i] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return torch.from_numpy(boxes)


# --- Training ----------------------------------------------------------------------------


def train_segmenter(
    data_root: Path,
    out_dir: Path,
    *,
    epochs: int,
    image_size: int,
    seed: int,
    batch_size: int = 4,
    learning_rate: float = 5e-4,
    max_minutes: float | None = None,
    num_threads: int = 1,
    score_threshold: float = 0.5,
    device: str | None = None,
    products_root: Path | None = None,
    init_from: Path | None = None,
    invoked_as: str | None = None,
) -> dict[str, Any]:
    """Train on CCP's training split, write the model folder, evaluate it on validation.

    `init_from` is a segmenter folder of the same classes and network to continue from, in
    place of the ImageNet backbone; the card names its model version.

    `score_threshold` is the folder's, below which the worker drops instances.
    `max_minutes` bounds the time spent fitting: the learning-rate schedule then follows
    whichever of steps or time is further along, and training ends when either is done.
    With `products_root` (clothing-small's validation folder) the card also reports how
    often product photos are found (`evaluate_product_photos`). `invoked_as` is the command
    line to quote in the model card, when it was not `enrich`.
    Gives the summary written into the model card: data, schedule, times and metrics.
    """
    started = time.perf_counter()
    torch.set_num_threads(num_threads)
    _seed_everything(seed)
    target = resolve_device(device)
    split = ccp.split_pixel_annotated(data_root)
    lookup = class_lookup(ccp.load_label_names(data_root), GARMENT_CLASSES)

    short_side = round(image_size * CACHE_SCALE)
    examples = load_examples(data_root, split.train, short_side=short_side, lookup=lookup)
    data_seconds = _since(started)
    log.info("training_data_loaded", images=len(examples), seconds=data_seconds)

    model = _new_model(image_size)
    init_version = None if init_from is None else load_initial_weights(model, init_from)
    model.to(target)
    schedule = _Schedule(
        total_steps=epochs * math.ceil(len(examples) / batch_size),
        max_seconds=None if max_minutes is None else max_minutes * 60.0,
    )
    steps = _fit(model, examples, schedule, batch_size, learning_rate, seed, target)
    train_seconds = round(_since(started) - data_seconds, 1)
    config = _write_model(model, out_dir, image_size=image_size, score_threshold=score_threshold)

    summary: dict[str, Any] = {
        "data": str(data_root), "out": str(out_dir), "epochs": epochs,
        "image_size": image_size, "seed": seed, "batch_size": batch_size,
        "learning_rate": learning_rate, "max_minutes": max_minutes, "threads": num_threads,
        "score_threshold": score_threshold,
        "device": str(target), "classes": config.classes, "train_images": len(examples),
        "validation_images": len(split.validation), "steps": steps,
        "epochs_done": round(steps * batch_size / len(examples), 2),
        "data_seconds": data_seconds, "train_seconds": train_seconds,
        "products": None if products_root is None else str(products_root),
        "init_from": None if init_from is None else str(init_from),
        "init_version": init_version,
    }  # fmt: skip
    summary["command"] = _enrich_command(summary)
    summary["invoked_as"] = invoked_as or summary["command"]
    summary.update(_validate(out_dir, data_root, split.validation, config, products_root, device))
    summary["total_seconds"] = _since(started)
    write_model_card(out_dir, summary)
    return summary


def _new_model(image_size: int) -> MaskRCNN:
    """A Mask R-CNN with ImageNet backbone weights, scale jitter up to `image_size`."""
    return build_model(
        len(GARMENT_CLASSES),
        architecture=_architecture(),
        min_size=tuple(round(image_size * factor) for factor in SCALE_JITTER),
        max_size=_max_size(image_size),
        pretrained_backbone=True,
    )


def load_initial_weights(model: nn.Module, model_dir: Path) -> str:
    """Load a trained folder's weights into `model` (built by `_new_model`); gives its version.

    The folder must have this trainer's classes and network, or ModelLoadError names the
    difference before any training starts.
    """
    config = read_config(model_dir)
    if config.classes != list(GARMENT_CLASSES):
        raise ModelLoadError(
            f"{model_dir} has classes {config.classes}; training needs {list(GARMENT_CLASSES)}"
        )
    if config.architecture != _architecture():
        raise ModelLoadError(
            f"{model_dir} has another network ({config.architecture.name}, "
            f"{config.architecture.fpn_channels} FPN channels); training builds "
            f"{_architecture().name} with {_architecture().fpn_channels}"
        )
    load_weights(model, model_dir / config.weights)
    version = model_version(config.name, model_dir)
    log.info("training_initialised", init_from=str(model_dir), model_version=version)
    return version


def _validate(
    model_dir: Path,
    data_root: Path,
    image_ids: Sequence[int],
    config: TorchvisionSegmenterConfig,
    products_root: Path | None,
    device: str | None,
) -> dict[str, Any]:
    """Metrics of the model folder as written, loaded the way the worker loads it.

    Gives {"metrics": CCP validation figures, "product_metrics": product figures or None}.
    """
    shipped = load_segmenter(SegmentationBackend.TORCHVISION, model_dir, device=device)
    segmenter = load_segmenter(
        SegmentationBackend.TORCHVISION,
        model_dir,
        device=device,
        score_threshold=AP_SCORE_THRESHOLD,
    )
    metrics = evaluate_segmenter(
        segmenter, data_root, image_ids=image_ids, score_threshold=config.score_threshold
    )
    products = None if products_root is None else evaluate_product_photos(shipped, products_root)
    return {"metrics": metrics, "product_metrics": products}


@dataclass
class _Schedule:
    """Linear warm-up, then cosine decay over steps or time, whichever runs out first."""

    total_steps: int
    max_seconds: float | None
    warmup_steps: int = 30
    started: float = field(default_factory=time.perf_counter)

    def progress(self, step: int) -> float:
        by_steps = step / self.total_steps
        if self.max_seconds is None:
            return by_steps
        return max(by_steps, (time.perf_counter() - self.started) / self.max_seconds)

    def factor(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.progress(step))))


def _fit(
    model: nn.Module,
    examples: Sequence[TrainingExample],
    schedule: _Schedule,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
) -> int:
    """Train `model` in place until the schedule ends; gives the number of steps taken."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    factors = repeat_factors(examples)
    model.train()

    step = 0
    while schedule.progress(step) < 1.0:
        for batch in _batches(factors, batch_size, rng):
            if schedule.progress(step) >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * schedule.factor(step)
            losses = _step(model, optimizer, [examples[i] for i in batch], rng, device)
            step += 1
            if step % 20 == 0:
                progress = round(schedule.progress(step), 3)
                log.info("training_step", step=step, progress=progress, **losses)
    return step


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[TrainingExample],
    rng: np.random.Generator,
    device: torch.device,
) -> dict[str, float]:
    samples = [make_sample(example, rng) for example in batch]
    images = [image.to(device) for image, _ in samples]
    targets = [{key: value.to(device) for key, value in target.items()} for _, target in samples]

    losses: dict[str, torch.Tensor] = model(images, targets)
    total = torch.stack(list(losses.values())).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    optimizer.step()
    return {name: round(float(value.detach()), 4) for name, value in losses.items()}


def repeat_factors(examples: Sequence[TrainingExample]) -> npt.NDArray[np.float64]:
    """(N,) how often each photo is shown per epoch, on average; see `REPEAT_THRESHOLD`."""
    present = [np.unique(example.labels) for example in examples]
    counts = np.bincount(np.concatenate(present), minlength=len(GARMENT_CLASSES) + 1)
    share = np.maximum(counts, 1) / len(examples)
    per_class = np.maximum(1.0, np.sqrt(REPEAT_THRESHOLD / share))
    return np.array([per_class[labels].max() for labels in present])


def _batches(
    factors: npt.NDArray[np.float64], batch_size: int, rng: np.random.Generator
) -> Iterator[list[int]]:
    """One epoch of photo indices, each repeated its factor's whole part, plus one more
    time with the chance of its fractional part, shuffled."""
    whole = np.floor(factors)
    repeats = whole + (rng.random(factors.size) < factors - whole)
    order = rng.permutation(np.repeat(np.arange(factors.size), repeats.astype(np.int64)))
    for start in range(0, order.size, batch_size):
        yield order[start : start + batch_size].tolist()


def _write_model(
    model: nn.Module, out_dir: Path, *, image_size: int, score_threshold: float
) -> TorchvisionSegmenterConfig:
    """config.json and weights.pt into `out_dir`, replacing any earlier model there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = TorchvisionSegmenterConfig(
        name=MODEL_NAME,
        architecture=_architecture(),
        classes=list(GARMENT_CLASSES),
        min_size=image_size,
        max_size=_max_size(image_size),
        score_threshold=score_threshold,
        training={
            "dataset": "CCP (Clothing Co-Parsing), pixel-level annotations",
            "ccp_classes": {name: list(members) for name, members in GARMENT_CLASSES.items()},
            "min_area_fraction": MIN_AREA_FRACTION,
            "merge_radius": MERGE_RADIUS,
        },
    )
    save_weights(model, out_dir / config.weights)
    (out_dir / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    return config


def _architecture() -> Architecture:
    return Architecture(name=ARCHITECTURE)


def _max_size(image_size: int) -> int:
    """Long-side limit: room for CCP's 2:3 portraits, then some."""
    return round(image_size * 1.75)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


# --- Evaluation --------------------------------------------------------------------------


def evaluate_segmenter(
    segmenter: Segmenter,
    data_root: Path,
    *,
    image_ids: Sequence[int] | None = None,
    score_threshold: float = 0.5,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Mask IoU for jeans and mask AP50 per class on CCP photos (default: validation split).

    Load `segmenter` with a low score threshold (`AP_SCORE_THRESHOLD`): AP ranks every
    instance it gives, while the IoUs count only instances scoring `score_threshold` or
    more, as the worker would keep them.

    - jeans_iou: mean over photos annotated with jeans of |pred & truth| / |pred | truth|,
      pred the union of the jeans masks, truth every jeans pixel;
    - trousers_iou: the same with jeans and pants taken as one class;
    - jeans_false_positive_rate: share of photos without jeans given a jeans mask;
    - ap50: COCO-style (101-point) mask AP at IoU 0.5 per class, and their mean over the
      classes that occur in the photos;
    - mean_iou: the mean over those classes of each class's mask IoU (`MaskScorer`);
    - by_threshold: the three IoU figures again at each of `THRESHOLD_SWEEP`.
    """
    if image_ids is None:
        image_ids = ccp.split_pixel_annotated(data_root).validation
    ids = list(image_ids)
    names = ccp.load_label_names(data_root)
    classes = [name for name in segmenter.classes if name in GARMENT_CLASSES]
    lookup = class_lookup(names, {name: GARMENT_CLASSES[name] for name in classes})
    scorer = MaskScorer(classes, score_threshold=score_threshold)
    thresholds = sorted({score_threshold, *THRESHOLD_SWEEP})
    overlaps: dict[float, dict[str, list[float]]] = {
        threshold: {"jeans": [], "trousers": [], "jeans_false_positive": []}
        for threshold in thresholds
    }

    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        photos = [ccp.load_photo(data_root, image_id) for image_id in batch]
        for image_id, result in zip(batch, segmenter.segment(photos), strict=True):
            label_map = lookup[ccp.load_pixel_mask(data_root, image_id)]
            scorer.add(result, ccp_truth(label_map, classes))
            for threshold, found in overlaps.items():
                _add_overlaps(result, label_map, classes, threshold, found)

    metrics = _summarise(scorer.figures(), overlaps[score_threshold])
    metrics["by_threshold"] = {
        str(threshold): _summarise_overlaps(found) for threshold, found in overlaps.items()
    }
    metrics.update(images=len(ids), score_threshold=score_threshold, seconds=_since(started))
    log.info(
        "segmenter_evaluated",
        **{k: v for k, v in metrics.items() if k not in ("ap50", "by_threshold")},
    )
    return metrics


def _add_overlaps(
    result: Segmentation,
    label_map: npt.NDArray[np.int64],
    classes: Sequence[str],
    score_threshold: float,
    overlaps: dict[str, list[float]],
) -> None:
    """Add one photo's jeans and trousers IoUs, over instances scoring `score_threshold` or
    more, to `overlaps`."""
    assert result.pred_masks is not None  # MaskScorer.add refused mask-less results first
    kept = result.mask_scores >= score_threshold
    kept_classes = [name for name, keep in zip(result.pred_classes, kept, strict=True) if keep]
    kept_masks = result.pred_masks[kept]
    if "jeans" in classes:
        _add_overlap(overlaps, "jeans", kept_masks, kept_classes, label_map, classes, ("jeans",))
    if set(TROUSERS) <= set(classes):
        _add_overlap(overlaps, "trousers", kept_masks, kept_classes, label_map, classes, TROUSERS)


def _add_overlap(
    overlaps: dict[str, list[float]],
    key: str,
    pred_masks: npt.NDArray[np.bool_],
    pred_classes: Sequence[str],
    label_map: npt.NDArray[np.int64],
    classes: Sequence[str],
    group: Sequence[str],
) -> None:
    """IoU of the predicted and annotated pixels of `group`, on photos that have them."""
    pred = pred_masks[[name in group for name in pred_classes]].any(axis=0)
    truth = np.isin(label_map, [classes.index(name) + 1 for name in group])
    if truth.any():
        overlaps[key].append(float((pred & truth).sum() / (pred | truth).sum()))
    elif key == "jeans":
        overlaps["jeans_false_positive"].append(float(pred.any()))


def _summarise(figures: MaskFigures, overlaps: Mapping[str, list[float]]) -> dict[str, Any]:
    per_class = figures["classes"]
    return {
        **_summarise_overlaps(overlaps),
        "jeans_images": len(overlaps["jeans"]),
        "trousers_images": len(overlaps["trousers"]),
        "ap50": {name: f["ap50"] for name, f in per_class.items() if f["ap50"] is not None},
        "map50": figures["map50"],
        "mean_iou": figures["mean_iou"],
        "truths": {name: f["num_truths"] for name, f in per_class.items()},
        "iou": {name: f["iou"] for name, f in per_class.items()},
        "iou_images": {name: f["iou_images"] for name, f in per_class.items()},
    }


def _summarise_overlaps(overlaps: Mapping[str, list[float]]) -> dict[str, float | None]:
    return {
        "jeans_iou": _mean(overlaps["jeans"]),
        "trousers_iou": _mean(overlaps["trousers"]),
        "jeans_false_positive_rate": _mean(overlaps["jeans_false_positive"]),
    }


def _mean(values: Sequence[float] | Sequence[bool]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def evaluate_product_photos(
    segmenter: Segmenter,
    products_root: Path,
    *,
    per_folder: int = 12,
    batch_size: int = 4,
) -> dict[str, dict[str, float | int | None]]:
    """How often the garment of a shop-style photo is found, per folder of `products_root`.

    Takes the first `per_folder` photos (by name) of each folder in `PRODUCT_FOLDERS`.
    Per folder: found, the share of photos with an instance of an expected class;
    top, the share whose highest-scoring instance is of an expected class.
    """
    results: dict[str, dict[str, float | int | None]] = {}
    for folder, expected in PRODUCT_FOLDERS.items():
        paths = sorted((products_root / folder).glob("*.jpg"))[:per_folder]
        found, top = [], []
        for start in range(0, len(paths), batch_size):
            photos = [_read_rgb(path) for path in paths[start : start + batch_size]]
            for result in segmenter.segment(photos):
                found.append(any(name in expected for name in result.pred_classes))
                top.append(bool(result.pred_classes) and result.pred_classes[0] in expected)
        if paths:
            results[folder] = {"photos": len(paths), "found": _mean(found), "top": _mean(top)}
    log.info("product_photos_evaluated", folders=len(results))
    return results


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


# --- Model card --------------------------------------------------------------------------


def write_model_card(out_dir: Path, summary: Mapping[str, Any]) -> None:
    """MODEL_CARD.md: what the model finds, its data, the command, its time and figures."""
    (out_dir / "MODEL_CARD.md").write_text(_model_card(summary))


def _model_card(summary: Mapping[str, Any]) -> str:
    metrics = summary["metrics"]
    classes = ", ".join(summary["classes"])
    ious, iou_images = metrics.get("iou", {}), metrics.get("iou_images", {})
    ap_rows = "\n".join(
        f"| {name} | {metrics['truths'][name]} | {metrics['ap50'].get(name, 'n/a')} | "
        f"{ious.get(name, 'n/a')} | {iou_images.get(name, 'n/a')} |"
        for name in summary["classes"]
    )
    sweep_rows = "\n".join(
        f"| {threshold} | {figures['jeans_iou']} | {figures['trousers_iou']} | "
        f"{figures['jeans_false_positive_rate']} |"
        for threshold, figures in metrics["by_threshold"].items()
    )
    return f"""# {MODEL_NAME}

Garment instance segmentation: torchvision Mask R-CNN on an EfficientNet-Lite0 + FPN
backbone ({_architecture().fpn_channels} channels), for the segmentation stage
(`handlers.segmentation`, backend `torchvision`). Masks come at the photo's size;
instances scoring under {summary["score_threshold"]} are dropped unless the worker sets
its own threshold.

Classes: {classes}.
Each gathers CCP classes, listed in `config.json` under `training.ccp_classes`; other
CCP classes (bags, belts, hats, suits, vests, skin, hair...) are background.

## Data

CCP (Clothing Co-Parsing) pixel-level annotations, images 0001-0900. Every 7th image by
id is kept for validation ({summary["validation_images"]} photos); the others train
({summary["train_images"]} photos with at least one garment). The photos are street shots
of people, not product photos; {PRODUCT_CROP_PROBABILITY:.0%} of training samples imitate a
shop photo by cutting one garment out onto a plain light ground. The photos are for
development only; see the dataset's README and LICENSE.

Instances are connected regions of a class: regions closer than about
{2 * MERGE_RADIUS} px (in the photo) merge, regions under {MIN_AREA_FRACTION:.1%} of the
photo are dropped.

## Command

    {summary["command"]}
{_provenance(summary)}
Seed {summary["seed"]}, {summary["threads"]} CPU thread(s), device `{summary["device"]}`,
short side {summary["image_size"]} px (training jitters it by x{min(SCALE_JITTER)}-1),
AdamW at {summary["learning_rate"]}, batches of {summary["batch_size"]}.

Training: {summary["train_seconds"] / 60:.1f} min for {summary["steps"]} steps
({summary["epochs_done"]} epochs), after {summary["data_seconds"] / 60:.1f} min reading
the data; {summary["total_seconds"] / 60:.1f} min in all with validation. The schedule is
bounded by `--max-minutes {summary["max_minutes"]}`, so a rerun on a busier machine
takes fewer steps and gives somewhat different figures.

## Validation on CCP

{metrics["images"]} validation photos. The IoUs count instances scoring at least
{metrics["score_threshold"]}, the shipped threshold.

| figure | value |
| --- | --- |
| jeans mask IoU, mean over the {metrics["jeans_images"]} photos with jeans | \
{metrics["jeans_iou"]} |
| trousers mask IoU (jeans and pants as one), mean over {metrics["trousers_images"]} \
photos | {metrics["trousers_iou"]} |
| share of photos without jeans given a jeans mask | \
{metrics["jeans_false_positive_rate"]} |
| mask AP50, mean over the classes | {metrics["map50"]} |
| mask IoU, mean over the classes | {metrics.get("mean_iou", "n/a")} |

| class | validation instances | mask AP50 | mask IoU | photos in the IoU |
| --- | --- | --- | --- | --- |
{ap_rows}

A class's mask IoU is the mean, over the photos whose truth has the class or where the
segmenter keeps a mask of it, of |pred & truth| / |pred or truth| (pred: the union of the
class's kept masks; truth: every pixel of the class); a mask of a class the photo lacks
counts 0, so it is lower than the jeans and trousers IoUs above, which count only photos with
the class. `enrich eval --json` with this folder (the worker's default settings) reports the
same AP50 and IoU figures on the same photos.

The IoUs at other score thresholds:

| score threshold | jeans IoU | trousers IoU | photos without jeans given jeans |
| --- | --- | --- | --- |
{sweep_rows}

AP50 follows COCO (101-point interpolation; greedy matching by score at mask IoU 0.5)
against the connected-region instances above, ranking every instance scoring at least
{AP_SCORE_THRESHOLD}. CCP labels are noisy (some red trousers are labelled jeans), and
jeans and pants are easily confused; the trousers IoU shows how much of the jeans error
is that confusion.
{_product_section(summary)}
## Limits

- Trained for {summary["train_seconds"] / 60:.0f} min on {_where(summary)}; a longer schedule on a \
GPU would do better.
- Small items (shoes) suffer most at this image size.
- Trained on street photos; product photos are only spot-checked (above).
"""


def _provenance(summary: Mapping[str, Any]) -> str:
    """The card's lines on how the command was run and what training started from."""
    lines = []
    if summary.get("invoked_as") not in (None, summary["command"]):
        lines.append(
            f"\nwhich was run, before the `enrich` command existed, as\n\n"
            f"    {summary['invoked_as']}\n"
        )
    if summary.get("init_from") is not None:
        lines.append(
            f"\nTraining continued from `{summary['init_from']}` as it was then "
            f"(`{summary['init_version']}`, whose card gave its own command), not from the "
            "ImageNet backbone alone.\n"
        )
    return "".join(lines)


def _where(summary: Mapping[str, Any]) -> str:
    if summary["device"] == "cpu":
        return f"{summary['threads']} CPU thread(s)"
    return f"device `{summary['device']}`"


def _product_section(summary: Mapping[str, Any]) -> str:
    products: Mapping[str, Mapping[str, Any]] | None = summary.get("product_metrics")
    if not products:
        return ""
    rows = "\n".join(
        f"| {folder} | {', '.join(PRODUCT_FOLDERS[folder])} | {figures['photos']} | "
        f"{figures['found']} | {figures['top']} |"
        for folder, figures in products.items()
    )
    return f"""
## Spot check on product photos

The first photos of each folder of `{summary["products"]}` (shop-style photos of one
item on a plain ground), at the shipped threshold. found: share of photos with an
instance of the expected classes; top: share whose best instance is of those classes.

| folder | expected | photos | found | top |
| --- | --- | --- | --- | --- |
{rows}
"""


# --- Command line ------------------------------------------------------------------------


def _enrich_command(summary: Mapping[str, Any]) -> str:
    """The `enrich` command that makes this model, every option spelt out."""
    options = {
        "--data": "data", "--out": "out", "--epochs": "epochs", "--image-size": "image_size",
        "--seed": "seed", "--batch-size": "batch_size", "--learning-rate": "learning_rate",
        "--max-minutes": "max_minutes", "--threads": "threads",
        "--score-threshold": "score_threshold", "--products": "products",
        "--init-from": "init_from",
    }  # fmt: skip
    words = ["enrich", "train", "segmenter"]
    for flag, key in options.items():
        if summary.get(key) is not None:
            words += [flag, str(summary[key])]
    return shlex.join(words)


_PROG = "handlers.training.segmenter"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {_PROG}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train on CCP and write the model folder")
    train.add_argument("--data", type=Path, default=ccp.DEFAULT_CCP_ROOT)
    train.add_argument("--out", type=Path, default=DEFAULT_OUT)
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--image-size", type=int, default=320)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--learning-rate", type=float, default=5e-4)
    train.add_argument("--max-minutes", type=float, default=None)
    train.add_argument("--threads", type=int, default=1)
    train.add_argument("--score-threshold", type=float, default=0.5)
    train.add_argument("--products", type=Path, default=None)

    evaluate = commands.add_parser("evaluate", help="evaluate a model folder on validation")
    evaluate.add_argument("--model", type=Path, default=DEFAULT_OUT)
    evaluate.add_argument("--data", type=Path, default=ccp.DEFAULT_CCP_ROOT)
    evaluate.add_argument("--backend", type=SegmentationBackend, default="torchvision")
    evaluate.add_argument("--score-threshold", type=float, default=0.5)
    evaluate.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parse(arguments)
    torch.set_num_threads(args.threads)

    if args.command == "train":
        invoked_as = shlex.join(["python", "-m", _PROG, *arguments])
        summary = train_segmenter(
            args.data, args.out, epochs=args.epochs, image_size=args.image_size,
            seed=args.seed, batch_size=args.batch_size, learning_rate=args.learning_rate,
            max_minutes=args.max_minutes, num_threads=args.threads,
            score_threshold=args.score_threshold, products_root=args.products,
            invoked_as=invoked_as,
        )  # fmt: skip
        print(json.dumps(summary, indent=2))
        return

    segmenter = load_segmenter(args.backend, args.model, score_threshold=AP_SCORE_THRESHOLD)
    metrics = evaluate_segmenter(segmenter, args.data, score_threshold=args.score_threshold)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
