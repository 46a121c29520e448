"""The figures models are judged by: mask AP50 and IoU, label F1, neighbour shares.

Training (`handlers.training`) and `enrich eval` (`worker.evaluate`) both score through
this module, so that a model card and an evaluation report mean the same thing by a name.
Nothing here reads a dataset: callers turn theirs into masks, label matrices and labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import numpy.typing as npt

from handlers.base import Segmentation

MATCH_IOU = 0.5
"""A predicted mask matches a ground-truth instance at this mask IoU or more (AP50)."""

IGNORED_SHARE = 0.5
"""An unmatched prediction lying this much or more inside a crowd region is not counted."""


# --- Masks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskTruth:
    """The ground truth of one photo, for `MaskScorer`.

    instance_masks (M, H, W) bool, one per instance AP matches against, with
    instance_classes M class names; class_regions, per class present, (H, W) bool every
    pixel of the class (what the IoU compares against); crowd_regions, per class, (H, W)
    bool pixels where predictions of that class are neither right nor wrong (COCO's
    `iscrowd`).
    """

    instance_masks: npt.NDArray[np.bool_]
    instance_classes: list[str]
    class_regions: Mapping[str, npt.NDArray[np.bool_]]
    crowd_regions: Mapping[str, npt.NDArray[np.bool_]] = field(default_factory=dict)


@dataclass
class ClassRecord:
    """Every ranked prediction of one class over the photos, the count of truths, and the
    per-photo IoUs of the class's kept masks."""

    scores: list[float] = field(default_factory=list)
    matched: list[bool] = field(default_factory=list)
    num_truths: int = 0
    ious: list[float] = field(default_factory=list)


class ClassFigures(TypedDict):
    num_truths: int
    ap50: float | None
    iou: float | None
    iou_images: int


class MaskFigures(TypedDict):
    """Mask AP50 and mean mask IoU, per class and their means over the classes with truths."""

    num_images: int
    score_threshold: float
    map50: float | None
    mean_iou: float | None
    classes: dict[str, ClassFigures]


class MaskScorer:
    """Mask AP50 and mean mask IoU per class, accumulated one photo at a time.

    AP50 ranks every instance the segmenter gives (load it with a low score threshold);
    COCO's 101-point interpolation, greedy matching by score at mask IoU 0.5, each truth
    once. The IoU counts only instances scoring `score_threshold` or more, as the worker
    keeps them: per class and photo, the union of its kept masks against every pixel of
    the class, on each photo where either is non-empty (a mask of a class the photo lacks
    is IoU 0); the class's IoU is the mean over those photos.
    """

    def __init__(self, classes: Sequence[str], *, score_threshold: float) -> None:
        self.classes = list(classes)
        self.score_threshold = score_threshold
        self.records = {name: ClassRecord() for name in self.classes}
        self.num_images = 0

    def add(self, result: Segmentation, truth: MaskTruth) -> None:
        """Score one photo's predictions against its ground truth."""
        if result.pred_masks is None:
            raise ValueError("mask figures need a segmenter that gives masks")
        self.num_images += 1

        kept = result.mask_scores >= self.score_threshold
        for name, record in self.records.items():
            chosen = np.array([pred == name for pred in result.pred_classes], dtype=bool)
            truths = truth.instance_masks[[c == name for c in truth.instance_classes]]
            match_predictions(
                result.pred_masks[chosen],
                result.mask_scores[chosen],
                truths,
                record,
                crowd=truth.crowd_regions.get(name),
            )
            region = truth.class_regions.get(name)
            _add_iou(record, result.pred_masks[chosen & kept], region)

    def figures(self) -> MaskFigures:
        classes = {
            name: ClassFigures(
                num_truths=r.num_truths,
                ap50=_round(average_precision(r.scores, r.matched, r.num_truths))
                if r.num_truths
                else None,
                iou=_round(float(np.mean(r.ious))) if r.ious else None,
                iou_images=len(r.ious),
            )
            for name, r in self.records.items()
        }
        present = [figures for figures in classes.values() if figures["num_truths"]]
        return MaskFigures(
            num_images=self.num_images,
            score_threshold=self.score_threshold,
            map50=_mean_of([f["ap50"] for f in present]),
            mean_iou=_mean_of([f["iou"] for f in present]),
            classes=classes,
        )


def _add_iou(
    record: ClassRecord,
    pred_masks: npt.NDArray[np.bool_],
    region: npt.NDArray[np.bool_] | None,
) -> None:
    """Append the IoU of the union of `pred_masks` (N, H, W) and `region` (H, W), if any."""
    pred = pred_masks.any(axis=0) if pred_masks.shape[0] else None
    if region is None or not region.any():
        if pred is not None and pred.any():
            record.ious.append(0.0)
        return
    if pred is None:
        record.ious.append(0.0)
        return

    record.ious.append(float((pred & region).sum() / (pred | region).sum()))


def match_predictions(
    pred_masks: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float32],
    truths: npt.NDArray[np.bool_],
    record: ClassRecord,
    *,
    crowd: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Greedy matching, highest score first, each truth once, at mask IoU `MATCH_IOU` or more.

    pred_masks (N, H, W) bool with scores (N,); truths (M, H, W) bool. An unmatched
    prediction lying mostly inside `crowd` (H, W) bool is left out of the ranking.
    """
    record.num_truths += truths.shape[0]
    matched = np.zeros(len(scores), dtype=bool)
    if truths.shape[0]:
        ious = mask_ious(pred_masks, truths)
        for i in np.argsort(-scores, kind="stable"):
            best = int(ious[i].argmax())
            if ious[i, best] >= MATCH_IOU:
                matched[i] = True
                ious[:, best] = -1.0

    counted = np.ones(len(scores), dtype=bool)
    if crowd is not None and crowd.any() and len(scores):
        areas = pred_masks.reshape(len(scores), -1).sum(axis=1)
        inside = (pred_masks & crowd).reshape(len(scores), -1).sum(axis=1)
        counted = matched | (inside < IGNORED_SHARE * np.maximum(areas, 1))
    record.scores += [float(score) for score in scores[counted]]
    record.matched += matched[counted].tolist()


def mask_ious(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """(N, M) IoU between masks a (N, H, W) and b (M, H, W)."""
    flat_a = a.reshape(a.shape[0], a[0].size if a.shape[0] else b[0].size).astype(np.float32)
    flat_b = b.reshape(b.shape[0], b[0].size if b.shape[0] else a[0].size).astype(np.float32)
    intersection = flat_a @ flat_b.T
    union = flat_a.sum(axis=1)[:, None] + flat_b.sum(axis=1)[None, :] - intersection
    ious: npt.NDArray[np.float64] = np.zeros(intersection.shape, dtype=np.float64)
    np.divide(intersection, union, out=ious, where=union > 0)
    return ious


def average_precision(scores: Sequence[float], matched: Sequence[bool], num_truths: int) -> float:
    """COCO's 101-point interpolated AP from every prediction's score and whether it matched."""
    if num_truths == 0:
        raise ValueError("AP is undefined without ground truth")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(matched, dtype=np.float64)[order]
    true_positives = np.cumsum(hits)
    recall = true_positives / num_truths
    precision = true_positives / np.arange(1, hits.size + 1)
    # The precision envelope: at each recall, the best precision at that recall or beyond.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]

    sampled = []
    for level in np.linspace(0.0, 1.0, 101):
        index = int(np.searchsorted(recall, level, side="left"))
        sampled.append(envelope[index] if index < envelope.size else 0.0)
    return float(np.mean(sampled))


# --- Labels ------------------------------------------------------------------------------


class LabelScores(TypedDict):
    f1: float
    precision: float
    recall: float
    support: int


def f1_scores(
    truth: npt.NDArray[np.bool_], predicted: npt.NDArray[np.bool_], labels: Sequence[str]
) -> tuple[float, dict[str, LabelScores]]:
    """Micro F1 and per-label scores of (N, L) bool truth against (N, L) bool predictions.

    An undefined ratio (nothing predicted, nothing true) counts as 0. Macro F1 is the mean
    of the per-label F1s (`macro_f1`).
    """
    true_pos = (truth & predicted).sum(axis=0)
    false_pos = (~truth & predicted).sum(axis=0)
    false_neg = (truth & ~predicted).sum(axis=0)

    per_label = {
        label: LabelScores(
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            precision=_ratio(tp, tp + fp),
            recall=_ratio(tp, tp + fn),
            support=int(tp + fn),
        )
        for label, tp, fp, fn in zip(labels, true_pos, false_pos, false_neg, strict=True)
    }
    micro = _ratio(2 * true_pos.sum(), 2 * true_pos.sum() + false_pos.sum() + false_neg.sum())
    return micro, per_label


def macro_f1(per_label: Mapping[str, LabelScores]) -> float:
    """The mean of the labels' F1, each label weighing the same."""
    return _round(float(np.mean([scores["f1"] for scores in per_label.values()])))


# --- Embeddings --------------------------------------------------------------------------


class NeighbourFigures(TypedDict):
    """How often a product's nearest neighbours share its label, and the same by chance."""

    num_products: int
    k: int
    neighbour_share: float
    chance_share: float
    label_counts: dict[str, int]


def neighbour_figures(
    embeddings: npt.NDArray[np.float32], labels: Sequence[str], *, k: int
) -> NeighbourFigures:
    """`neighbour_share` and `chance_share` of (N, D) unit embeddings with N labels."""
    return NeighbourFigures(
        num_products=len(labels),
        k=min(k, len(labels) - 1),
        neighbour_share=_round(neighbour_share(embeddings, labels, k=k)),
        chance_share=_round(chance_share(labels)),
        label_counts=dict(sorted(Counter(labels).items())),
    )


def neighbour_share(embeddings: npt.NDArray[np.float32], labels: Sequence[str], *, k: int) -> float:
    """Mean over products of the share of their k nearest neighbours with their label.

    embeddings (N, D) float32, unit rows; neighbours by cosine similarity, the product
    itself left out; k is cut to N - 1. Ties rank the earlier product first.
    """
    if len(labels) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(labels)} labels")
    if len(labels) < 2 or k < 1:
        raise ValueError(f"neighbours need 2 or more products and k >= 1, got {len(labels)}, {k}")

    similarities = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    np.fill_diagonal(similarities, -np.inf)
    nearest = np.argsort(-similarities, axis=1, kind="stable")[:, : min(k, len(labels) - 1)]
    names = np.asarray(labels)
    return float((names[nearest] == names[:, None]).mean())


def chance_share(labels: Sequence[str]) -> float:
    """The share of another product, drawn at random, that has a product's label.

    sum over labels of n (n - 1) / (N (N - 1)): about the sum of the squared label shares.
    """
    total = len(labels)
    if total < 2:
        raise ValueError(f"chance needs 2 or more products, got {total}")
    counts = np.array(list(Counter(labels).values()), dtype=np.float64)
    return float((counts * (counts - 1)).sum() / (total * (total - 1)))


# --- Numbers -----------------------------------------------------------------------------


def _ratio(numerator: int | np.integer, denominator: int | np.integer) -> float:
    return _round(float(numerator) / float(denominator)) if denominator else 0.0


def _mean_of(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return _round(float(np.mean(known))) if known else None


def _round(value: float) -> float:
    return round(value, 4)
