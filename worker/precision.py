"""`enrich bench precision`: each stage's results under mixed precision against float32, on
the same real photos, and the stages where they hold.

On CUDA the worker runs its stages under float16 autocast (`ENRICH_BATCH__MIXED_PRECISION`);
a stage whose results move past `TOLERANCES` belongs in `ENRICH_BATCH__FULL_PRECISION_STAGES`,
which the report lists as `full_precision_stages`. On a CPU the worker always runs float32;
`--cpu-dtype bfloat16` runs the same comparison under bfloat16 autocast there, which checks
this comparison but says nothing of float16 on a GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch

from handlers.base import RGBImage, Segmentation, Stage, Tags
from handlers.segmentation import resolve_device
from schemas.settings import Settings
from worker.batching import precision
from worker.bench_stages import bench_products, machine
from worker.models import Models, load_models

log = structlog.get_logger(__name__)

TOLERANCES: dict[Stage, dict[str, float]] = {
    Stage.SEGMENTATION: {"top_class_agreement": 0.95, "top_mask_iou_median": 0.9},
    Stage.TAGGING: {
        "score_max_diff": 0.02,
        "label_agreement": 0.95,
        "image_embedding_min_cosine": 0.999,
    },
    Stage.EMBEDDING: {"min_cosine": 0.999},
}
"""Per stage, the bounds its figures must keep: `*_diff` at most, the others at least."""


@dataclass(frozen=True)
class _Outputs:
    segments: list[Segmentation]
    tags: list[Tags]
    scores: npt.NDArray[np.float32]
    image_vectors: npt.NDArray[np.float32]
    text_vectors: npt.NDArray[np.float32]


def compare_precision(
    models: Models,
    pixels: Sequence[RGBImage],
    texts: Sequence[str],
    mixed: Callable[[], AbstractContextManager[Any]],
) -> dict[str, Any]:
    """Run every stage on the same input in float32, then inside `mixed()`; per stage the
    figures, whether they keep `TOLERANCES`, and the stages that do not."""
    full = _run(models, pixels, texts)

    with mixed():
        reduced = _run(models, pixels, texts)

    stages = {
        Stage.SEGMENTATION: _segmentation_figures(full.segments, reduced.segments),
        Stage.TAGGING: _tagging_figures(full, reduced),
        Stage.EMBEDDING: {"texts": len(texts), "min_cosine": _min_cosine(full, reduced)},
    }
    for stage, figures in stages.items():
        figures["holds"] = holds(stage, figures)
        log.info("precision_compared", stage=stage, **figures)
    return {
        "stages": {str(stage): figures for stage, figures in stages.items()},
        "full_precision_stages": [str(s) for s, figures in stages.items() if not figures["holds"]],
    }


def holds(stage: Stage, figures: dict[str, Any]) -> bool:
    """Whether `figures` keep the stage's tolerances; a figure with nothing to measure (None)
    keeps them."""
    for name, bound in TOLERANCES[stage].items():
        value = figures[name]
        if value is None:
            continue
        if (value > bound) if name.endswith("_diff") else (value < bound):
            return False
    return True


def _run(models: Models, pixels: Sequence[RGBImage], texts: Sequence[str]) -> _Outputs:
    segments = models.segmenter.segment(pixels)
    tags, image_vectors = models.tagger.tag_and_embed(pixels)
    scores = np.array([list(t.scores.values()) for t in tags], dtype=np.float32)
    return _Outputs(segments, tags, scores, image_vectors, models.embedder.embed(texts))


def _segmentation_figures(
    full: Sequence[Segmentation], reduced: Sequence[Segmentation]
) -> dict[str, Any]:
    """On the photos where float32 finds an instance: how often the top instance keeps its
    class, how far its box moves, how much its mask overlaps."""
    pairs = [(f, r) for f, r in zip(full, reduced, strict=True) if f.num_masks]
    same_class = [bool(r.num_masks) and r.pred_classes[0] == f.pred_classes[0] for f, r in pairs]
    found = [(f, r) for f, r in pairs if r.num_masks]
    box_shifts = [float(np.abs(f.pred_boxes[0] - r.pred_boxes[0]).max()) for f, r in found]
    ious = [
        _iou(f.pred_masks[0], r.pred_masks[0])
        for f, r in found
        if f.pred_masks is not None and r.pred_masks is not None
    ]
    return {
        "photos": len(full),
        "photos_with_instances": len(pairs),
        "same_instance_count": _share(
            [f.num_masks == r.num_masks for f, r in zip(full, reduced, strict=True)]
        ),
        "top_class_agreement": _share(same_class),
        "top_box_max_shift_px": round(max(box_shifts), 2) if box_shifts else None,
        "top_mask_iou_median": round(float(np.median(ious)), 4) if ious else None,
    }


def _tagging_figures(full: _Outputs, reduced: _Outputs) -> dict[str, Any]:
    same_labels = [
        [label.label for label in f.labels] == [label.label for label in r.labels]
        for f, r in zip(full.tags, reduced.tags, strict=True)
    ]
    cosines = (full.image_vectors * reduced.image_vectors).sum(axis=1)
    return {
        "photos": len(full.tags),
        "score_max_diff": round(float(np.abs(full.scores - reduced.scores).max()), 5),
        "label_agreement": _share(same_labels),
        "image_embedding_min_cosine": round(float(cosines.min()), 6),
    }


def _min_cosine(full: _Outputs, reduced: _Outputs) -> float:
    return round(float((full.text_vectors * reduced.text_vectors).sum(axis=1).min()), 6)


def _iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def run_precision_check(
    settings: Settings, datasets: Path, *, photos: int, cpu_dtype: torch.dtype | None
) -> dict[str, Any]:
    """`compare_precision` with the worker's models on `photos` product photos: float16 on
    CUDA, or `cpu_dtype` autocast on a CPU; a CPU without `cpu_dtype` has nothing to check."""
    device = resolve_device(settings.models.device)
    if device.type != "cuda" and cpu_dtype is None:
        raise ValueError(
            f"mixed precision runs on CUDA only and this worker's device is {device}; "
            "pass --cpu-dtype bfloat16 to run the comparison on the CPU"
        )
    products = bench_products(datasets, photos)
    pixels = [product.pixels(settings.images.max_pixels) for product in products]

    models = load_models(settings.models)
    report = compare_precision(
        models,
        pixels,
        [product.text for product in products],
        lambda: precision(device, mixed=True, cpu_dtype=cpu_dtype),
    )

    dtype = torch.float16 if device.type == "cuda" else cpu_dtype
    return {
        "machine": machine(settings),
        "dtype": str(dtype).removeprefix("torch."),
        "tolerances": {str(stage): bounds for stage, bounds in TOLERANCES.items()},
        **report,
    }


def print_precision_check(report: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['dtype']} against float32 on {report['machine']['device']}:")
    for stage, figures in report["stages"].items():
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "holds")
        print(f"  {stage:<13} {'holds' if figures['holds'] else 'MOVES'}: {shown}")
    kept = report["full_precision_stages"]
    if kept:
        print(f"ENRICH_BATCH__FULL_PRECISION_STAGES='{json.dumps(kept)}' keeps those float32")
