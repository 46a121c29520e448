"""Training and evaluation of the tagger on CCP's image-level tagged photos (ids 1005-1990).

The worker imports this module too, when it unpickles a tagger export: the export refers
to `PhotoTags` by name, so it must stay importable here under that name.

Run as `python -m handlers.training.tagger --data ../shared/datasets/ccp --out models/tagger`;
`--calibrate-only` chooses the per-label thresholds of an existing tagger folder again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import cloudpickle
import fastai.callback.schedule  # noqa: F401 (adds Learner.fine_tune)
import numpy as np
import numpy.typing as npt
import structlog
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.learner import Learner
from fastai.metrics import accuracy_multi
from fastai.torch_core import set_seed
from fastai.vision.augment import Resize, ResizeMethod, aug_transforms
from fastai.vision.data import (
    DataBlock,
    FuncSplitter,
    ImageBlock,
    MultiCategoryBlock,
    Normalize,
)
from fastai.vision.learner import vision_learner
from torch import nn

from handlers.backbones import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    efficientnet_lite0,
)
from handlers.base import ModelLoadError, model_version
from handlers.evaluation import LabelScores, f1_scores, macro_f1
from handlers.tagging import (
    CONFIG_FILE,
    EXPORT_FILE,
    ExportVersions,
    F1Figures,
    LabelCalibration,
    Tagger,
    TaggerConfig,
    ThresholdCalibration,
    load_tagger_learner,
)
from handlers.training.ccp import (
    DEFAULT_CCP_ROOT,
    image_annotated_ids,
    load_image_tags,
    load_label_names,
    load_photo,
    photo_path,
)

log = structlog.get_logger(__name__)

VALIDATION_EVERY = 5
"""Photos whose id is a multiple of 5 are the validation set (198 of 986), the rest train."""

EXCLUDED_LABELS = frozenset(
    {"null", "skin", "hair", "accessories", "bracelet", "earrings", "necklace", "ring", "watch"}
)
"""Never tagged: body parts and background are in every photo, `accessories` is a catch-all,
and jewellery is a few pixels wide at the training size."""

MIN_LABEL_COUNT = 50
"""A label is kept when at least this many of the 788 training photos carry it: 28 labels
from bag (420) to shorts (57) and glasses (56), each on at least 9 validation photos. Vest
(39), wedges, flats, jumper, leggings, cardigan (22) and rarer ones fall short."""

BACKBONE_CUT = -2
"""timm's EfficientNet ends in global_pool and classifier; fastai's head replaces both."""

DEFAULT_THRESHOLD = 0.2
"""Every label's threshold before calibration, and a label's fallback when it cannot be
calibrated."""

THRESHOLD_FLOOR = 0.05
"""No calibrated threshold is lower: below it a label fires on nearly every photo."""

THRESHOLD_GRID_STEP = 0.01

MIN_CALIBRATION_SUPPORT = 1
"""A label on fewer validation photos keeps DEFAULT_THRESHOLD."""

THRESHOLD_SHRINKAGE = 20.0
"""Calibrated thresholds are drawn towards DEFAULT_THRESHOLD as if this many more photos
had chosen it. On the shipped tagger's validation photos, held out in two halves, the bare
best-F1 thresholds raised macro F1 from 0.341 to 0.358 but cut micro F1 from 0.437 to
0.407 (rare labels fire more often); drawn with 20, macro F1 0.355 and micro F1 0.436."""

VALIDATION_PHOTOS = f"CCP validation photos (ids divisible by {VALIDATION_EVERY})"

MODEL_CARD_FILE = "MODEL_CARD.md"
MAX_FOLDER_BYTES = 30 * 1024 * 1024


class EvaluationReport(TypedDict):
    """F1 of a tagger folder on the validation photos, at the tagger's thresholds.

    `model_version` is the folder's version when it was evaluated.
    """

    model_version: str
    num_images: int
    thresholds: dict[str, float]
    micro_f1: float
    macro_f1: float
    per_label: dict[str, LabelScores]


class TrainingReport(TypedDict):
    """What `train_tagger` did: its options, the data, the time, and the folder's F1."""

    data_root: str
    out_dir: str
    labels: list[str]
    num_train: int
    num_validation: int
    epochs: int
    image_size: int
    seed: int
    threshold: float
    freeze_epochs: int
    base_lr: float
    lr_mult: float
    batch_size: int
    min_label_count: int
    threshold_floor: float
    device: str
    train_seconds: float
    export_bytes: int
    evaluation: EvaluationReport
    calibration: dict[str, Any]


@dataclass(frozen=True)
class PhotoTags:
    """get_y: the kept label names of a CCP photo, read from its image-level annotation.

    `label_names` indexes CCP's class indices; `labels` are the names kept for training.
    The photo's dataset root is two folders up from `photos/NNNN.jpg`.
    """

    label_names: tuple[str, ...]
    labels: frozenset[str]

    def __call__(self, path: Path) -> list[str]:
        indices = load_image_tags(path.parent.parent, int(path.stem))
        return [self.label_names[i] for i in indices if self.label_names[i] in self.labels]


def is_validation(image_id: int) -> bool:
    return image_id % VALIDATION_EVERY == 0


def is_validation_photo(path: Path) -> bool:
    """The splitter: a photo path is for validation when its id is."""
    return is_validation(int(Path(path).stem))


def choose_labels(
    tags_by_image: Mapping[int, Sequence[str]], *, min_count: int = MIN_LABEL_COUNT
) -> list[str]:
    """Labels carried by at least `min_count` training photos, less EXCLUDED_LABELS, sorted."""
    counts = Counter(
        label
        for image_id, labels in tags_by_image.items()
        if not is_validation(image_id)
        for label in set(labels)
    )
    return sorted(
        label
        for label, count in counts.items()
        if count >= min_count and label not in EXCLUDED_LABELS
    )


def label_priors(
    tags_by_image: Mapping[int, Sequence[str]], labels: Sequence[str]
) -> npt.NDArray[np.float32]:
    """(L,) share of the training photos that carry each label."""
    train = [set(tags) for image_id, tags in tags_by_image.items() if not is_validation(image_id)]
    counts = [sum(label in tags for tags in train) for label in labels]
    return (np.array(counts) / max(len(train), 1)).astype(np.float32)


def read_tags(data_root: Path, image_ids: Sequence[int]) -> dict[int, list[str]]:
    """Every label name present in each photo, background excluded."""
    names = load_label_names(data_root)
    return {i: [names[index] for index in load_image_tags(data_root, i)] for i in image_ids}


def train_tagger(
    data_root: Path,
    out_dir: Path,
    *,
    epochs: int,
    image_size: int,
    seed: int,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_floor: float = THRESHOLD_FLOOR,
    freeze_epochs: int = 3,
    base_lr: float = 2e-3,
    lr_mult: float = 10,
    batch_size: int = 32,
    min_label_count: int = MIN_LABEL_COUNT,
    lin_ftrs: list[int] | None = None,
    max_images: int | None = None,
    num_threads: int = 1,
    name: str = "ccp-tagger-efficientnet-lite0",
) -> TrainingReport:
    """Fine-tune EfficientNet-Lite0 on CCP's tagged photos and write a tagger folder.

    `out_dir` gets export.pkl, tagger.json and MODEL_CARD.md. The report holds the
    validation F1 at one `threshold` for every label, then `calibrate_tagger` chooses each
    label's threshold (never below `threshold_floor`) and the report holds its figures too.
    `max_images` keeps the first ids only, for quick trial runs.
    """
    started = time.perf_counter()
    torch.set_num_threads(num_threads)
    set_seed(seed, reproducible=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    image_ids = image_annotated_ids(data_root)[:max_images]
    tags = read_tags(data_root, image_ids)
    labels = choose_labels(tags, min_count=min_label_count)
    photos = [photo_path(data_root, i) for i in image_ids]
    log.info("tagger_training_started", num_images=len(photos), labels=labels)

    learner = _learner(data_root, photos, labels, image_size, batch_size, lin_ftrs, threshold)
    _start_from_priors(learner, label_priors(tags, labels))
    fit_started = time.perf_counter()
    learner.fine_tune(epochs, base_lr=base_lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult)
    train_seconds = time.perf_counter() - fit_started

    device = _device_description(str(learner.dls.device))
    export_bytes = _export(learner, out_dir, name, labels, threshold, image_size)
    evaluation = evaluate_tagger(out_dir, data_root, image_ids=image_ids)
    calibration = calibrate_tagger(
        out_dir, data_root, default_threshold=threshold, floor=threshold_floor, image_ids=image_ids
    )

    report = TrainingReport(
        data_root=str(data_root),
        out_dir=str(out_dir),
        labels=labels,
        num_train=len(learner.dls.train_ds),
        num_validation=len(learner.dls.valid_ds),
        epochs=epochs,
        image_size=image_size,
        seed=seed,
        threshold=threshold,
        freeze_epochs=freeze_epochs,
        base_lr=base_lr,
        lr_mult=lr_mult,
        batch_size=batch_size,
        min_label_count=min_label_count,
        threshold_floor=threshold_floor,
        device=device,
        train_seconds=round(train_seconds, 1),
        export_bytes=export_bytes,
        evaluation=evaluation,
        calibration=calibration.model_dump(),
    )
    write_model_card(out_dir, report)
    _check_folder_size(out_dir)
    log.info(
        "tagger_trained",
        model_version=model_version(name, out_dir),
        micro_f1=evaluation["micro_f1"],
        macro_f1=evaluation["macro_f1"],
        micro_f1_held_out=calibration.held_out.micro_f1,
        macro_f1_held_out=calibration.held_out.macro_f1,
        train_seconds=report["train_seconds"],
        seconds=round(time.perf_counter() - started, 1),
    )
    return report


def evaluate_tagger(
    model_dir: Path,
    data_root: Path,
    *,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> EvaluationReport:
    """Micro and macro F1 of a tagger folder on the validation photos, at its thresholds.

    `image_ids` defaults to every tagged photo; only its validation ids are scored.
    """
    candidates = image_annotated_ids(data_root) if image_ids is None else image_ids
    ids = [i for i in candidates if is_validation(i)]
    return score_tagger(Tagger(model_dir=model_dir), data_root, ids, batch_size=batch_size)


def score_tagger(
    tagger: Tagger, data_root: Path, image_ids: Sequence[int], *, batch_size: int = 32
) -> EvaluationReport:
    """Micro and macro F1 of a loaded tagger on exactly these tagged CCP photos.

    The photos go through `Tagger.predict_scores`, the worker's own path, and a label is
    predicted when its score is above the tagger's threshold for it.
    """
    ids = list(image_ids)
    tags = read_tags(data_root, ids)

    truth = np.array([[label in tags[i] for label in tagger.labels] for i in ids], dtype=bool)
    scores = _predict_photos(tagger, data_root, ids, batch_size)
    thresholds = np.array([tagger.thresholds[label] for label in tagger.labels])
    predicted = scores > thresholds

    micro_f1, per_label = f1_scores(truth, predicted, tagger.labels)
    return EvaluationReport(
        model_version=tagger.model_version,
        num_images=len(ids),
        thresholds=tagger.thresholds,
        micro_f1=micro_f1,
        macro_f1=macro_f1(per_label),
        per_label=per_label,
    )


def _predict_photos(
    tagger: Tagger, data_root: Path, image_ids: Sequence[int], batch_size: int
) -> npt.NDArray[np.float32]:
    """(N, L) scores of the photos, `batch_size` at a time."""
    batches = [
        image_ids[start : start + batch_size] for start in range(0, len(image_ids), batch_size)
    ]
    return np.concatenate(
        [tagger.predict_scores([load_photo(data_root, i) for i in batch]) for batch in batches]
    )


def calibrate_tagger(
    model_dir: Path,
    data_root: Path,
    *,
    default_threshold: float = DEFAULT_THRESHOLD,
    floor: float = THRESHOLD_FLOOR,
    min_support: int = MIN_CALIBRATION_SUPPORT,
    shrinkage: float = THRESHOLD_SHRINKAGE,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> ThresholdCalibration:
    """Choose a tagger folder's per-label thresholds on the validation photos, in place.

    tagger.json gets the thresholds and the `ThresholdCalibration` figures; MODEL_CARD.md,
    where there is one, gets them in its Thresholds section. `image_ids` defaults to every
    tagged photo; only its validation ids are used.
    """
    tagger = Tagger(model_dir=model_dir)
    candidates = image_annotated_ids(data_root) if image_ids is None else image_ids
    ids = [i for i in candidates if is_validation(i)]
    tags = read_tags(data_root, ids)
    truth = np.array([[label in tags[i] for label in tagger.labels] for i in ids], dtype=bool)
    scores = _predict_photos(tagger, data_root, ids, batch_size)

    calibration = calibrate(
        truth,
        scores,
        tagger.labels,
        halves=np.array([calibration_half(i) for i in ids]),
        photos=VALIDATION_PHOTOS,
        default_threshold=default_threshold,
        floor=floor,
        min_support=min_support,
        shrinkage=shrinkage,
    )
    thresholds = {label: c.threshold for label, c in calibration.labels.items()}
    config = tagger.config.model_copy(update={"thresholds": thresholds, "calibration": calibration})
    config.write(model_dir / CONFIG_FILE)
    card = model_dir / MODEL_CARD_FILE
    if card.is_file():
        card.write_text(replace_section(card.read_text(), thresholds_section(calibration)))

    log.info(
        "tagger_calibrated",
        model_version=model_version(config.name, model_dir),
        num_images=len(ids),
        micro_f1_before=calibration.before.micro_f1,
        micro_f1_held_out=calibration.held_out.micro_f1,
        macro_f1_before=calibration.before.macro_f1,
        macro_f1_held_out=calibration.held_out.macro_f1,
    )
    return calibration


def calibration_half(image_id: int) -> int:
    """0 or 1: validation ids alternate between the two halves of the held-out figures."""
    return (image_id // VALIDATION_EVERY) % 2


def calibrate(
    truth: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float32],
    labels: Sequence[str],
    *,
    halves: npt.NDArray[np.int_],
    photos: str,
    default_threshold: float = DEFAULT_THRESHOLD,
    floor: float = THRESHOLD_FLOOR,
    min_support: int = MIN_CALIBRATION_SUPPORT,
    shrinkage: float = THRESHOLD_SHRINKAGE,
) -> ThresholdCalibration:
    """Per-label thresholds from (N, L) bool truth and (N, L) float scores.

    Each label's best-F1 threshold (`best_thresholds`) is drawn towards `default_threshold`
    as if `shrinkage` more photos had chosen the default: (n t + k d) / (n + k) with n the
    label's positives. `halves` (N,) 0 or 1 splits the photos for the held-out figures:
    thresholds chosen on one half predict the other.
    """
    options = {"default": default_threshold, "floor": floor, "shrinkage": shrinkage}
    best = best_thresholds(truth, scores, labels, floor=floor, min_support=min_support)
    thresholds = _shrunk(best, truth.sum(axis=0), labels, **options)
    held_out = np.zeros(truth.shape, dtype=bool)
    for half in (0, 1):
        rows = halves == half
        other = best_thresholds(
            truth[~rows], scores[~rows], labels, floor=floor, min_support=min_support
        )
        held_out[rows] = scores[rows] > _shrunk(other, truth[~rows].sum(axis=0), labels, **options)

    before = f1_scores(truth, scores > default_threshold, labels)
    after = f1_scores(truth, scores > thresholds, labels)
    held = f1_scores(truth, held_out, labels)
    support = truth.sum(axis=0)
    return ThresholdCalibration(
        photos=photos,
        num_images=len(truth),
        default_threshold=default_threshold,
        floor=floor,
        grid_step=THRESHOLD_GRID_STEP,
        min_support=min_support,
        shrinkage=shrinkage,
        before=_figures(before),
        after=_figures(after),
        held_out=_figures(held),
        labels={
            label: LabelCalibration(
                threshold=float(thresholds[index]),
                best_threshold=best[label],
                support=int(support[index]),
                default_f1=before[1][label]["f1"],
                f1=after[1][label]["f1"],
                held_out_f1=held[1][label]["f1"],
            )
            for index, label in enumerate(labels)
        },
    )


def _shrunk(
    best: Mapping[str, float | None],
    support: npt.NDArray[np.int_],
    labels: Sequence[str],
    *,
    default: float,
    floor: float,
    shrinkage: float,
) -> npt.NDArray[np.float64]:
    """(L,) thresholds: each label's best drawn towards `default`, on the grid, >= floor."""
    chosen = np.array([default if best[label] is None else best[label] for label in labels])
    drawn = (support * chosen + shrinkage * default) / np.maximum(support + shrinkage, 1e-9)
    on_grid = np.round(np.round(drawn / THRESHOLD_GRID_STEP) * THRESHOLD_GRID_STEP, 4)
    clipped: npt.NDArray[np.float64] = np.clip(on_grid, floor, 1.0 - THRESHOLD_GRID_STEP)
    return clipped


def best_thresholds(
    truth: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float32],
    labels: Sequence[str],
    *,
    floor: float,
    min_support: int,
) -> dict[str, float | None]:
    """Per label, the grid threshold from `floor` up with the highest F1.

    Among equally good thresholds the middle one is taken. A label with fewer than
    `min_support` positives, or with F1 0 at every threshold, gets None.
    """
    grid = np.round(np.arange(floor, 1.0 - THRESHOLD_GRID_STEP / 2, THRESHOLD_GRID_STEP), 4)
    predicted = scores[None, :, :] > grid[:, None, None]
    true_pos = (predicted & truth[None]).sum(axis=1)
    false_pos = (predicted & ~truth[None]).sum(axis=1)
    false_neg = truth.sum(axis=0)[None, :] - true_pos
    denominator = 2 * true_pos + false_pos + false_neg
    f1 = np.divide(
        2 * true_pos, denominator, out=np.zeros(denominator.shape), where=denominator > 0
    )

    thresholds: dict[str, float | None] = {}
    for index, label in enumerate(labels):
        best = f1[:, index].max()
        if truth[:, index].sum() < min_support or best == 0:
            thresholds[label] = None
            continue
        tied = np.flatnonzero(f1[:, index] >= best - 1e-9)
        thresholds[label] = float(grid[tied[len(tied) // 2]])
    return thresholds


def _figures(scores: tuple[float, Mapping[str, LabelScores]]) -> F1Figures:
    micro, per_label = scores
    return F1Figures(micro_f1=micro, macro_f1=macro_f1(per_label))


def thresholds_section(calibration: ThresholdCalibration) -> list[str]:
    """The model card's Thresholds section: how they were chosen and F1 before and after."""
    values = [c.threshold for c in calibration.labels.values()]
    fallbacks = [label for label, c in calibration.labels.items() if c.best_threshold is None]
    rows = [
        f"| {label} | {c.support} | {_grid_value(c.best_threshold)} | {c.threshold:.2f} "
        f"| {c.default_f1:.2f} | {c.f1:.2f} | {c.held_out_f1:.2f} |"
        for label, c in calibration.labels.items()
    ]
    default = calibration.default_threshold
    kept = f": {', '.join(fallbacks)}" if fallbacks else ""
    return [
        "## Thresholds",
        "",
        f"One threshold per label, calibrated on the {calibration.num_images} "
        f"{calibration.photos}: the threshold on a {calibration.grid_step} grid from "
        f"{calibration.floor} to 0.99 with the best F1 (the middle one of equals), then drawn "
        f"towards {default} as if {calibration.shrinkage:g} more photos had chosen {default} "
        f"(a label with few positives moves little). A label on {_fewer_than(calibration)}, "
        f"or with F1 0 at every threshold, keeps {default}; {len(fallbacks)} did{kept}. "
        f"The thresholds range from {min(values):.2f} "
        f"to {max(values):.2f}. Made by `enrich train tagger` after training, and again on "
        "an existing folder by `enrich train tagger --calibrate-only`.",
        "",
        "Choosing and scoring thresholds on the same photos flatters them, so the held-out "
        "row chooses them on one half of the validation photos (ids alternating) and scores "
        "the other half, both ways round, pooled: that row is the figure to expect. The "
        "shrinkage itself was picked by looking at held-out figures of this tagger.",
        "",
        "| thresholds | micro F1 | macro F1 |",
        "| --- | --- | --- |",
        f"| every label {default} | {calibration.before.micro_f1:.3f} "
        f"| {calibration.before.macro_f1:.3f} |",
        f"| calibrated on one half, scored on the other | "
        f"**{calibration.held_out.micro_f1:.3f}** | **{calibration.held_out.macro_f1:.3f}** |",
        f"| calibrated and scored on the same photos | {calibration.after.micro_f1:.3f} "
        f"| {calibration.after.macro_f1:.3f} |",
        "",
        f"| label | support | best-F1 threshold | threshold | F1 at {default} "
        "| F1 (same photos) | F1 held out |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def _fewer_than(calibration: ThresholdCalibration) -> str:
    if calibration.min_support <= 1:
        return "none of the photos"
    return f"fewer than {calibration.min_support} of the photos"


def _grid_value(threshold: float | None) -> str:
    return "none" if threshold is None else f"{threshold:.2f}"


def replace_section(card: str, section: list[str]) -> str:
    """The card with `section` (its first line the `## ` heading) in place of the old one.

    A card without that section gets it before Limitations, or at its end.
    """
    lines = card.splitlines()
    heading = section[0]
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
    else:
        start = end = lines.index("## Limitations") if "## Limitations" in lines else len(lines)
    return "\n".join([*lines[:start], *section, *lines[end:]]) + "\n"


def write_model_card(out_dir: Path, report: TrainingReport) -> None:
    """MODEL_CARD.md: data, the command that made the folder, time, device, F1 and the
    thresholds' calibration."""
    evaluation = report["evaluation"]
    rows = [
        f"| {label} | {s['support']} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |"
        for label, s in evaluation["per_label"].items()
    ]
    lines = [
        "# Tagger: EfficientNet-Lite0 on Clothing Co-Parsing",
        "",
        f"Multi-label tagger for {len(report['labels'])} garment and accessory labels: "
        f"{', '.join(report['labels'])}.",
        "",
        "## Data",
        "",
        f"CCP's image-level tagged photos (ids 1005-1990) from `{report['data_root']}`: "
        f"{report['num_train']} train, {report['num_validation']} validation "
        f"(every id divisible by {VALIDATION_EVERY}). Labels are those on at least "
        f"{report['min_label_count']} training photos, less {', '.join(sorted(EXCLUDED_LABELS))}. "
        "The photos are third-party street shots: for development only, never product content.",
        "",
        "## Training",
        "",
        "Made from the repository root with",
        "",
        "```",
        f"python -m handlers.training.tagger {_options(report)}",
        "```",
        "",
        f"which is `enrich train tagger {_options(report)}`.",
        "",
        "ImageNet EfficientNet-Lite0 (`handlers.backbones.efficientnet_lite0`) with fastai's "
        "head, its output layer started at each label's training share. fastai `fine_tune`: "
        f"{report['freeze_epochs']} epoch(s) of the head alone (batch norms frozen too), then "
        f"{report['epochs']} epoch(s) of the whole network, batch size {report['batch_size']}. "
        f"Photos squished to {report['image_size']} x {report['image_size']}, flips, small "
        "rotations, zooms and lighting changes. Training took "
        f"{report['train_seconds'] / 60:.1f} minutes on {report['device']}.",
        "",
        "## Validation",
        "",
        f"On the {evaluation['num_images']} validation photos, before calibration (every "
        f"threshold {report['threshold']}): micro F1 **{evaluation['micro_f1']:.3f}**, "
        f"macro F1 **{evaluation['macro_f1']:.3f}**.",
        "",
        "| label | support | precision | recall | F1 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        *thresholds_section(ThresholdCalibration.model_validate(report["calibration"])),
        "## Limitations",
        "",
        "A first baseline, not a product model. CCP has few tagged photos, its labels are "
        "noisy (some red trousers are `jeans`) and overlap (bag, purse, wallet; shoes, heels, "
        "sandals), small items (glasses, socks, belts) are a few pixels at this size, and the "
        "training was limited to what two shared CPU cores do in about 15 minutes. Street "
        "photos of whole outfits are not product photos: expect different figures on a catalog.",
        "",
    ]
    (out_dir / MODEL_CARD_FILE).write_text("\n".join(lines))


def _learner(
    data_root: Path,
    photos: list[Path],
    labels: list[str],
    image_size: int,
    batch_size: int,
    lin_ftrs: list[int] | None,
    threshold: float,
) -> Learner:
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=labels)),
        get_y=PhotoTags(tuple(load_label_names(data_root)), frozenset(labels)),
        splitter=FuncSplitter(is_validation_photo),
        item_tfms=Resize(image_size, method=ResizeMethod.Squish),
        batch_tfms=[
            *aug_transforms(),
            Normalize.from_stats(EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD),
        ],
    )
    loaders = block.dataloaders(photos, bs=batch_size, num_workers=0)

    # normalize=False: fastai knows no statistics for a callable architecture; the
    # backbone's own are in batch_tfms above. train_bn=False: frozen epochs then train the
    # head alone and skip the backward pass through the body, about 3 times cheaper on CPU.
    learner = vision_learner(
        loaders,
        efficientnet_lite0,
        normalize=False,
        cut=BACKBONE_CUT,
        lin_ftrs=lin_ftrs,
        metrics=[partial(accuracy_multi, thresh=threshold)],
        cbs=[ChannelsLast()],
        train_bn=False,
    )
    return learner


def _start_from_priors(learner: Learner, priors: npt.NDArray[np.float32]) -> None:
    """Make the untrained head predict each label's training share for every photo.

    A randomly initialised output layer starts far from the label frequencies and spends
    most of a short CPU training unlearning that. fastai's last layer has no bias (a batch
    norm precedes it), so it is replaced by one with a zero weight and a bias of the
    priors' log-odds; the features then only have to explain the rest.
    """
    head = learner.model[-1]
    previous = head[-1]
    if not isinstance(previous, nn.Linear) or previous.out_features != len(priors):
        raise TypeError(f"expected the head to end in a Linear of {len(priors)}, got {previous}")

    output = nn.Linear(previous.in_features, len(priors))
    with torch.no_grad():
        output.weight.zero_()
        output.bias.copy_(torch.logit(torch.from_numpy(priors).clamp(1e-3, 1 - 1e-3)))
    head[-1] = output.to(previous.weight.device)

    # The optimizer made by vision_learner's freeze() holds the replaced layer's parameters.
    learner.opt = None
    learner.freeze()


class NamedCall:
    """A callable with a `__name__`, standing for the local function fasttransform wraps
    around a getter that has none (`Transform.__init__.<locals>.wrapped_enc`)."""

    def __init__(self, call: Any, name: str) -> None:
        self.call = call
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


class _ExportPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no hints
    """fastai's export pickler, less the Python bytecode it would copy into the export.

    cloudpickle copies a function by value (its bytecode) where it cannot name it: fastai's
    classmethods such as `PILBase.create` (the class gives a bound method, not the function)
    and fasttransform's wrapper of a getter without a `__name__`. Bytecode runs only on the
    Python release that wrote it: on another one it crashes the process (seen: an export of
    Python 3.11 tagging on 3.12). The first is written by reference, the second as a
    NamedCall, so that the export loads on any Python that has the same libraries.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.MethodType) and isinstance(obj.__self__, type):
            name = obj.__func__.__name__
            if getattr(obj.__self__, name, None) == obj:
                return getattr, (obj.__self__, name)
        if isinstance(obj, types.FunctionType):
            # The installed function, or a copy of it that an earlier export rebuilt.
            bound = getattr(_owner_class(obj), obj.__name__, None)
            if isinstance(bound, types.MethodType) and bound.__func__.__code__ == obj.__code__:
                return getattr, (bound, "__func__")
            if obj.__qualname__.endswith("<locals>.wrapped_enc") and obj.__closure__:
                return NamedCall, (obj.__closure__[0].cell_contents, obj.__name__)
        return super().reducer_override(obj)


def _owner_class(function: types.FunctionType) -> type | None:
    """The class a function is defined in, found by its module and qualified name."""
    owner: Any = sys.modules.get(function.__module__)
    for part in function.__qualname__.split(".")[:-1]:
        owner = getattr(owner, part, None)
    return owner if isinstance(owner, type) else None


EXPORT_PICKLE = types.SimpleNamespace(Pickler=_ExportPickler, __name__="enrich_export_pickle")
"""The `pickle_module` of `Learner.export`: torch.save takes its `Pickler`."""


def export_learner(learner: Learner, out_dir: Path) -> int:
    """Write the learner's export.pkl without bytecode; returns its size in bytes."""
    learner.to_contiguous()
    learner.path = out_dir
    # The pickler's own frames deepen the recursion over fastai's nested pipelines.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        learner.export(EXPORT_FILE, pickle_module=EXPORT_PICKLE)
    finally:
        sys.setrecursionlimit(limit)
    return (out_dir / EXPORT_FILE).stat().st_size


def reexport_tagger(model_dir: Path) -> int:
    """Load a tagger folder's export and write it again by `export_learner`; the weights and
    the pipeline stay as they were. Run it under the Python release that wrote the export.
    Returns the new export's size in bytes."""
    config = TaggerConfig.model_validate_json((model_dir / CONFIG_FILE).read_text())
    learner = load_tagger_learner(model_dir, config, torch.device("cpu"))
    return export_learner(learner, model_dir)


def _export(
    learner: Learner, out_dir: Path, name: str, labels: list[str], threshold: float, size: int
) -> int:
    """Write export.pkl and tagger.json; returns export.pkl's size in bytes."""
    export_learner(learner, out_dir)

    config = TaggerConfig(
        name=name,
        labels=[str(label) for label in learner.dls.vocab],
        thresholds={label: threshold for label in labels},
        image_size=size,
        versions=ExportVersions.installed(),
    )
    config.write(out_dir / CONFIG_FILE)
    return (out_dir / EXPORT_FILE).stat().st_size


def _check_folder_size(out_dir: Path) -> None:
    size = sum(path.stat().st_size for path in out_dir.rglob("*") if path.is_file())
    if size > MAX_FOLDER_BYTES:
        log.warning(
            "model_folder_too_large",
            out_dir=str(out_dir),
            bytes=size,
            limit_bytes=MAX_FOLDER_BYTES,
            hint="shrink the head, e.g. lin_ftrs=[256]",
        )


def _options(report: TrainingReport) -> str:
    return (
        f"--data {report['data_root']} --out {report['out_dir']} --epochs {report['epochs']} "
        f"--freeze-epochs {report['freeze_epochs']} --image-size {report['image_size']} "
        f"--seed {report['seed']} --threshold {report['threshold']} "
        f"--threshold-floor {report['threshold_floor']} --base-lr {report['base_lr']} "
        f"--lr-mult {report['lr_mult']} "
        f"--batch-size {report['batch_size']} --min-label-count {report['min_label_count']}"
    )


def _device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tagger on CCP's tagged photos.")
    parser.add_argument("--data", type=Path, default=DEFAULT_CCP_ROOT)
    parser.add_argument("--out", type=Path, default=Path("models/tagger"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--freeze-epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--threshold-floor", type=float, default=THRESHOLD_FLOOR)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--lr-mult", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-label-count", type=int, default=MIN_LABEL_COUNT)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--calibrate-only", action="store_true")
    args = parser.parse_args(argv)

    if args.evaluate_only:
        result: Mapping[str, object] = evaluate_tagger(args.out, args.data)
    elif args.calibrate_only:
        result = calibrate_tagger(
            args.out,
            args.data,
            default_threshold=args.threshold,
            floor=args.threshold_floor,
            image_ids=image_annotated_ids(args.data)[: args.max_images],
            batch_size=args.batch_size,
        ).model_dump()
    else:
        result = train_tagger(
            args.data,
            args.out,
            epochs=args.epochs,
            freeze_epochs=args.freeze_epochs,
            image_size=args.image_size,
            seed=args.seed,
            threshold=args.threshold,
            threshold_floor=args.threshold_floor,
            base_lr=args.base_lr,
            lr_mult=args.lr_mult,
            batch_size=args.batch_size,
            min_label_count=args.min_label_count,
            max_images=args.max_images,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: an export made here would
    # otherwise hold PhotoTags from __main__, pickled by value with this file's path.
    from handlers.training.tagger import main as importable_main

    try:
        importable_main()
    except ModelLoadError as error:
        raise SystemExit(str(error)) from error
