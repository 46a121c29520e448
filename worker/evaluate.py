"""`enrich eval`: the figures of the models the worker runs, on labelled photos.

The models load through `worker.models.load_models`, from the same settings as the worker:
its segmenter backend and folder, its tagger and thresholds, its embedding models. The
figures are those of `handlers.evaluation`, which training reports too:

- segmentation: mask AP50 per class and their mean, and mean mask IoU at the worker's
  score threshold, on CCP's pixel-annotated photos (by default the held-out validation
  split, never training photos) or on a COCO instance-segmentation file and its images;
- tagging: micro, macro and per-label F1 at the tagger's own thresholds, on CCP's
  image-level tagged photos (validation split);
- image embeddings: the share of a product's k nearest neighbours with its main garment
  label, on the segmentation photos (the label covering most of the ground truth) and on a
  folder of product photos with one sub-folder per label (clothing-small);
- text embeddings: the same share on a JSON lines file of labelled products, if given.

Each neighbour share comes with the share expected by chance.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain, islice, zip_longest
from pathlib import Path
from typing import Any, TypedDict, TypeVar, final

import numpy as np
import numpy.typing as npt
import structlog
from pycocotools import mask as coco_masks
from pydantic import BaseModel, Field, ValidationError

from handlers.base import RGBImage
from handlers.embedding import product_text
from handlers.evaluation import MaskFigures, MaskScorer, MaskTruth, neighbour_figures
from handlers.image_embedding import ImageEmbedder
from handlers.segmentation import Segmenter, load_segmenter
from handlers.training import ccp
from handlers.training.segmenter import AP_SCORE_THRESHOLD, GARMENT_CLASSES, ccp_truth, class_lookup
from handlers.training.tagger import EvaluationReport, is_validation, score_tagger
from schemas.settings import REPO_ROOT, Settings
from worker.models import Models, load_models
from worker.stores.images import decode_image

log = structlog.get_logger(__name__)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "ccp"
DEFAULT_PRODUCT_PHOTOS = REPO_ROOT.parent / "shared" / "datasets" / "clothing-small" / "validation"
DEFAULT_NEIGHBOURS = 5
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

T = TypeVar("T")


class Split(StrEnum):
    VALIDATION = "validation"
    ALL = "all"


class EvaluationInputError(ValueError):
    """A dataset, COCO file or products file cannot be evaluated; nothing was measured."""


@dataclass(frozen=True)
class EvaluationOptions:
    """What to evaluate on. `coco` and `images` go together and replace CCP's
    pixel-annotated photos; `limit` caps every set at its first N photos or products."""

    data: Path = DEFAULT_DATA
    coco: Path | None = None
    images: Path | None = None
    product_photos: Path | None = DEFAULT_PRODUCT_PHOTOS
    products: Path | None = None
    split: Split = Split.VALIDATION
    limit: int | None = None
    k: int = DEFAULT_NEIGHBOURS
    batch_size: int = 4


@final
class Skipped(TypedDict):
    """A stage that could not be measured, and why."""

    reason: str


class SegmentationReport(MaskFigures):
    dataset: str
    source: str
    split: str
    ap_score_threshold: float


class TaggingReport(EvaluationReport):
    """F1 at the tagger's thresholds; `thresholds_chosen_on` and `held_out` come from the
    tagger's calibration, if any: where its photos are the ones scored here, F1 flatters
    the thresholds, and `held_out` (chosen on one half, scored on the other) is the figure
    to expect."""

    split: str
    thresholds_chosen_on: str | None
    held_out: dict[str, float] | None


class EvaluationDocument(TypedDict):
    model_versions: dict[str, str]
    segmentation: SegmentationReport
    tagging: TaggingReport | Skipped
    image_embedding: dict[str, Any]
    text_embedding: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class LabelledPhoto:
    """A photo (H, W, 3) uint8 with its mask ground truth and its main label, if any."""

    name: str
    image: RGBImage
    truth: MaskTruth
    main_label: str | None


# --- The run -----------------------------------------------------------------------------


def run_evaluation(settings: Settings, options: EvaluationOptions) -> EvaluationDocument:
    """Load the worker's models and measure every stage on the sets of `options`."""
    _check_options(options)
    started = time.perf_counter()
    models = load_models(settings.models)
    image_embedder = ImageEmbedder(models.tagger)
    threshold = models.segmenter.score_threshold

    ranking = _ranking_segmenter(settings, threshold)
    segmentation, embeddings, labels = _evaluate_photos(
        ranking, threshold, image_embedder, settings, options
    )
    image_embedding: dict[str, Any] = {
        segmentation["dataset"]: _neighbours(embeddings, labels, options.k),
        "product_photos": _evaluate_product_photos(image_embedder, settings, options),
    }

    versions = models.versions.model_dump(mode="json")
    document = EvaluationDocument(
        model_versions={**versions, "image_embedding": image_embedder.model_version},
        segmentation=segmentation,
        tagging=_evaluate_tagging(models, options),
        image_embedding=image_embedding,
        text_embedding=_evaluate_products(models, options),
        seconds=round(time.perf_counter() - started, 1),
    )
    log.info("evaluation_finished", seconds=document["seconds"])
    return document


def _check_options(options: EvaluationOptions) -> None:
    if (options.coco is None) != (options.images is None):
        raise EvaluationInputError("--coco and --images go together: give both or neither")
    if options.limit is not None and options.limit < 1:
        raise EvaluationInputError(f"--limit must be 1 or more, got {options.limit}")
    if options.k < 1:
        raise EvaluationInputError(f"-k must be 1 or more, got {options.k}")


def _ranking_segmenter(settings: Settings, worker_threshold: float) -> Segmenter:
    """The worker's segmenter again, keeping instances down to `AP_SCORE_THRESHOLD`: AP
    ranks them all, the IoU keeps those at `worker_threshold`, as the worker does."""
    return load_segmenter(
        settings.models.segmentation_backend,
        settings.models.segmenter_dir,
        device=settings.models.device,
        score_threshold=min(worker_threshold, AP_SCORE_THRESHOLD),
    )


# --- Segmentation and the photos' embeddings ---------------------------------------------


def _evaluate_photos(
    segmenter: Segmenter,
    threshold: float,
    image_embedder: ImageEmbedder,
    settings: Settings,
    options: EvaluationOptions,
) -> tuple[SegmentationReport, npt.NDArray[np.float32], list[str]]:
    """Segment and embed the labelled photos: the mask figures (IoU at `threshold`), and
    the embeddings (N, D) float32 of the N photos with a main label, with those labels."""
    if options.coco is not None and options.images is not None:
        dataset, source = "coco", str(options.coco)
        coco = read_coco(options.coco)
        classes = _coco_classes(coco, segmenter.classes)
        photos = coco_photos(coco, options.images, classes, settings.images.max_pixels)
    else:
        dataset, source = "ccp", str(options.data)
        classes = [name for name in segmenter.classes if name in GARMENT_CLASSES]
        photos = ccp_photos(options.data, classes, options.split)
    scorer = MaskScorer(classes, score_threshold=threshold)

    started = time.perf_counter()
    embeddings: list[npt.NDArray[np.float32]] = []
    labels: list[str] = []
    for batch in _batches(_limited(photos, options.limit), options.batch_size):
        images = [photo.image for photo in batch]
        for photo, result in zip(batch, segmenter.segment(images), strict=True):
            scorer.add(result, photo.truth)
        named = [i for i, photo in enumerate(batch) if photo.main_label is not None]
        embeddings.append(image_embedder.embed([images[i] for i in named]))
        labels += [str(batch[i].main_label) for i in named]

    figures = scorer.figures()
    log.info(
        "segmentation_evaluated",
        dataset=dataset,
        num_images=figures["num_images"],
        map50=figures["map50"],
        mean_iou=figures["mean_iou"],
        seconds=round(time.perf_counter() - started, 1),
    )
    report = SegmentationReport(
        dataset=dataset,
        source=source,
        split=options.split if dataset == "ccp" else "all",
        ap_score_threshold=min(threshold, AP_SCORE_THRESHOLD),
        **figures,
    )
    stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, 1), dtype=np.float32)
    return report, stacked, labels


def ccp_photos(root: Path, classes: Sequence[str], split: Split) -> Iterator[LabelledPhoto]:
    """CCP's pixel-annotated photos (the validation split unless `split` is all), with
    instances and class regions as training makes them, and the class covering most pixels.
    """
    if not classes:
        raise EvaluationInputError("the segmenter has none of the CCP garment classes")
    divided = ccp.split_pixel_annotated(root)
    ids = divided.validation if split == Split.VALIDATION else divided.train + divided.validation
    lookup = class_lookup(ccp.load_label_names(root), {n: GARMENT_CLASSES[n] for n in classes})

    for image_id in sorted(ids):
        label_map = lookup[ccp.load_pixel_mask(root, image_id)]
        areas = np.bincount(label_map.ravel(), minlength=len(classes) + 1)[1:]
        yield LabelledPhoto(
            name=f"{image_id:04d}",
            image=ccp.load_photo(root, image_id),
            truth=ccp_truth(label_map, classes),
            main_label=classes[int(areas.argmax())] if areas.any() else None,
        )


# --- COCO --------------------------------------------------------------------------------


class CocoRle(BaseModel):
    counts: str | list[int]
    size: tuple[int, int]


class CocoImage(BaseModel):
    id: int
    file_name: str = Field(min_length=1)
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class CocoAnnotation(BaseModel):
    id: int
    image_id: int
    category_id: int
    segmentation: list[list[float]] | CocoRle
    iscrowd: int = 0


class CocoCategory(BaseModel):
    id: int
    name: str = Field(min_length=1)


class CocoFile(BaseModel):
    """The parts of a COCO instance-segmentation file that evaluation reads."""

    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory]


def read_coco(path: Path) -> CocoFile:
    try:
        return CocoFile.model_validate_json(path.read_bytes())
    except OSError as error:
        raise EvaluationInputError(f"cannot read COCO file {path}: {error}") from error
    except ValidationError as error:
        raise EvaluationInputError(
            f"{path} is not a COCO instance-segmentation file (images, annotations with "
            f"segmentation polygons or RLE, categories): {error}"
        ) from error


def _coco_classes(coco: CocoFile, segmenter_classes: Sequence[str]) -> list[str]:
    """The segmenter's classes that a COCO category names; categories match by name."""
    names = {category.name for category in coco.categories}
    classes = [name for name in segmenter_classes if name in names]
    if not classes:
        raise EvaluationInputError(
            f"no COCO category names a segmenter class: categories {sorted(names)[:20]}, "
            f"segmenter classes {list(segmenter_classes)}"
        )
    return classes


def coco_photos(
    coco: CocoFile, images_dir: Path, classes: Sequence[str], max_pixels: int
) -> Iterator[LabelledPhoto]:
    """The COCO file's images in id order, decoded as the worker decodes photos, with the
    annotations of `classes` as ground truth; the main label is the category, of any name,
    whose annotations cover most pixels."""
    names = {category.id: category.name for category in coco.categories}
    by_image: dict[int, list[CocoAnnotation]] = defaultdict(list)
    for annotation in coco.annotations:
        if annotation.category_id not in names:
            raise EvaluationInputError(
                f"annotation {annotation.id}: category_id {annotation.category_id} is not "
                f"among the categories {sorted(names)[:20]}"
            )
        by_image[annotation.image_id].append(annotation)

    for image in sorted(coco.images, key=lambda entry: entry.id):
        pixels = _read_coco_image(images_dir, image, max_pixels)
        annotations = by_image.get(image.id, [])
        masks = [annotation_mask(a, image.height, image.width) for a in annotations]
        labels = [names[a.category_id] for a in annotations]
        yield LabelledPhoto(
            name=image.file_name,
            image=pixels,
            truth=_coco_truth(masks, labels, [a.iscrowd == 1 for a in annotations], classes),
            main_label=_largest(masks, labels),
        )


def annotation_mask(annotation: CocoAnnotation, height: int, width: int) -> npt.NDArray[np.bool_]:
    """The annotation's mask (H, W) bool from its polygons or its RLE (either form)."""
    segmentation = annotation.segmentation
    if isinstance(segmentation, CocoRle):
        if tuple(segmentation.size) != (height, width):
            raise EvaluationInputError(
                f"annotation {annotation.id}: RLE size {list(segmentation.size)} is not its "
                f"image's {[height, width]}"
            )
        rle: Any = {"counts": segmentation.counts, "size": [height, width]}
        if isinstance(segmentation.counts, list):
            rle = coco_masks.frPyObjects(rle, height, width)
        else:
            rle["counts"] = segmentation.counts.encode()
    else:
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            raise EvaluationInputError(
                f"annotation {annotation.id}: segmentation has no polygon of 3 or more points"
            )
        rle = coco_masks.merge(coco_masks.frPyObjects(polygons, height, width))
    decoded: npt.NDArray[np.bool_] = coco_masks.decode(rle).astype(bool)
    return decoded


def _coco_truth(
    masks: Sequence[npt.NDArray[np.bool_]],
    labels: Sequence[str],
    crowd: Sequence[bool],
    classes: Sequence[str],
) -> MaskTruth:
    """Instances are the non-crowd annotations of `classes`; a class's region is the union
    of all its annotations, crowd ones too."""
    regions: dict[str, npt.NDArray[np.bool_]] = {}
    crowd_regions: dict[str, npt.NDArray[np.bool_]] = {}
    for mask, label, is_crowd in zip(masks, labels, crowd, strict=True):
        if label not in classes:
            continue
        regions[label] = regions[label] | mask if label in regions else mask
        if is_crowd:
            crowd_regions[label] = crowd_regions[label] | mask if label in crowd_regions else mask

    instances = [
        i for i, (label, is_crowd) in enumerate(zip(labels, crowd, strict=True))
        if label in classes and not is_crowd
    ]  # fmt: skip
    shape = masks[0].shape if masks else (0, 0)
    return MaskTruth(
        instance_masks=np.stack([masks[i] for i in instances])
        if instances
        else np.zeros((0, *shape), dtype=bool),
        instance_classes=[labels[i] for i in instances],
        class_regions=regions,
        crowd_regions=crowd_regions,
    )


def _largest(masks: Sequence[npt.NDArray[np.bool_]], labels: Sequence[str]) -> str | None:
    areas: dict[str, int] = defaultdict(int)
    for mask, label in zip(masks, labels, strict=True):
        areas[label] += int(mask.sum())
    return max(areas, key=lambda label: areas[label]) if areas else None


def _read_coco_image(images_dir: Path, image: CocoImage, max_pixels: int) -> RGBImage:
    path = images_dir / image.file_name
    pixels = _read_photo(path, max_pixels)
    if pixels.shape[:2] != (image.height, image.width):
        raise EvaluationInputError(
            f"image {image.id} ({path}) is {pixels.shape[0]}x{pixels.shape[1]} (height x "
            f"width, EXIF rotation applied), but the COCO file says "
            f"{image.height}x{image.width}"
        )
    return pixels


def _read_photo(path: Path, max_pixels: int) -> RGBImage:
    """The photo as the worker decodes it (`decode_image`)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EvaluationInputError(f"cannot read photo {path}: {error}") from error
    return decode_image(str(path), data, max_pixels=max_pixels).pixels


# --- Tagging -----------------------------------------------------------------------------


def _evaluate_tagging(models: Models, options: EvaluationOptions) -> TaggingReport | Skipped:
    """F1 on CCP's image-level tagged photos, validation split unless `split` is all."""
    try:
        ids = ccp.image_annotated_ids(options.data)
    except FileNotFoundError as error:
        return Skipped(reason=f"no CCP image-level tags: {error}")
    if options.split == Split.VALIDATION:
        ids = [i for i in ids if is_validation(i)]

    started = time.perf_counter()
    report = score_tagger(models.tagger, options.data, ids[: options.limit])
    log.info(
        "tagging_evaluated",
        num_images=report["num_images"],
        micro_f1=report["micro_f1"],
        macro_f1=report["macro_f1"],
        seconds=round(time.perf_counter() - started, 1),
    )
    calibration = models.tagger.config.calibration
    return TaggingReport(
        **report,
        split=options.split,
        thresholds_chosen_on=calibration.photos if calibration else None,
        held_out=calibration.held_out.model_dump() if calibration else None,
    )


# --- Embeddings --------------------------------------------------------------------------


def _neighbours(
    embeddings: npt.NDArray[np.float32], labels: Sequence[str], k: int
) -> dict[str, Any]:
    if len(labels) < 2:
        return _unmeasured(f"{len(labels)} labelled products; neighbours need 2 or more")
    return dict(neighbour_figures(embeddings, labels, k=k))


def _unmeasured(reason: str) -> dict[str, Any]:
    return {"neighbour_share": None, "chance_share": None, "reason": reason}


def _evaluate_product_photos(
    image_embedder: ImageEmbedder, settings: Settings, options: EvaluationOptions
) -> dict[str, Any]:
    """Image-embedding neighbours on a folder with one sub-folder of photos per label."""
    folder = options.product_photos
    if folder is None or not folder.is_dir():
        return _unmeasured(f"no product photo folder: {folder}")

    paths = _limited(product_photo_paths(folder), options.limit)
    embeddings = [
        image_embedder.embed([_read_photo(p, settings.images.max_pixels) for p in batch])
        for batch in _batches(iter(paths), options.batch_size)
    ]
    labels = [path.parent.name for path in paths]
    stacked = np.concatenate(embeddings) if embeddings else np.zeros((0, 1), dtype=np.float32)
    return {"source": str(folder), **_neighbours(stacked, labels, options.k)}


def product_photo_paths(folder: Path) -> list[Path]:
    """The photos of each sub-folder, by name, taken in turn from each sub-folder (so that
    the first N mix the labels)."""
    per_label = [
        sorted(p for p in sub.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
    ]
    return [path for path in chain.from_iterable(zip_longest(*per_label)) if path is not None]


class LabelledProduct(BaseModel):
    """One line of `--products`: what a shop gives, and a label to judge neighbours by."""

    title: str
    description: str = ""
    attributes: dict[str, str | list[str]] | list[str] = Field(default_factory=list)
    label: str = Field(min_length=1)


def _evaluate_products(models: Models, options: EvaluationOptions) -> dict[str, Any]:
    """Text-embedding neighbours on labelled products, embedded as the worker embeds them."""
    if options.products is None:
        return _unmeasured(
            "no labelled product texts given (--products FILE.jsonl); the photo sets have no "
            "text, and a text made from their labels would only echo them"
        )

    products = read_products(options.products)[: options.limit]
    texts = [product_text(p.title, p.description, p.attributes) for p in products]
    embeddings = models.embedder.embed(texts)
    labels = [product.label for product in products]
    return {"source": str(options.products), **_neighbours(embeddings, labels, options.k)}


def read_products(path: Path) -> list[LabelledProduct]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise EvaluationInputError(f"cannot read products file {path}: {error}") from error

    products = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            products.append(LabelledProduct.model_validate_json(line))
        except ValidationError as error:
            raise EvaluationInputError(
                f"{path} line {number} ({line[:60]!r}) is not a labelled product (title, "
                f"description, attributes, label): {error}"
            ) from error
    return products


# --- Helpers -----------------------------------------------------------------------------


def _limited(items: Iterable[T], limit: int | None) -> list[T]:
    """The first `limit` items, or all; an iterator is read no further."""
    return list(items if limit is None else islice(items, limit))


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- Output ------------------------------------------------------------------------------


def to_json(document: EvaluationDocument) -> str:
    return json.dumps(document, indent=2)


def format_table(document: EvaluationDocument) -> str:
    """The figures as a few readable tables."""
    segmentation = document["segmentation"]
    lines = [f"{stage:<16} {version}" for stage, version in document["model_versions"].items()]
    lines += [
        "",
        f"segmentation on {segmentation['num_images']} {segmentation['dataset']} photos "
        f"({segmentation['split']}): mask AP50 {segmentation['map50']}, mean mask IoU "
        f"{segmentation['mean_iou']} (IoU at score >= {segmentation['score_threshold']})",
        f"  {'class':<12} {'truths':>7} {'AP50':>7} {'IoU':>7}",
        *(
            f"  {name:<12} {f['num_truths']:>7} {_cell(f['ap50'])} {_cell(f['iou'])}"
            for name, f in segmentation["classes"].items()
        ),
        "",
        *_tagging_lines(document["tagging"]),
        "",
        "embeddings: share of the k nearest neighbours with the product's label (chance)",
        *(
            _neighbour_line(f"image, {name}", figures)
            for name, figures in document["image_embedding"].items()
        ),
        _neighbour_line("text", document["text_embedding"]),
        "",
        f"{document['seconds']} s",
    ]
    return "\n".join(lines)


def _tagging_lines(tagging: TaggingReport | Skipped) -> list[str]:
    if "micro_f1" not in tagging:
        return [f"tagging: not measured: {tagging['reason']}"]
    held_out = tagging["held_out"] or {}
    calibrated = (
        f"  thresholds chosen on {tagging['thresholds_chosen_on']}; chosen on one half and "
        f"scored on the other: micro F1 {held_out.get('micro_f1')}, macro F1 "
        f"{held_out.get('macro_f1')}"
        if tagging["thresholds_chosen_on"]
        else "  thresholds not calibrated"
    )
    return [
        f"tagging on {tagging['num_images']} photos ({tagging['split']}): micro F1 "
        f"{tagging['micro_f1']}, macro F1 {tagging['macro_f1']}",
        calibrated,
        f"  {'label':<12} {'support':>7} {'F1':>7} {'threshold':>9}",
        *(
            f"  {label:<12} {s['support']:>7} {_cell(s['f1'])} {tagging['thresholds'][label]:>9}"
            for label, s in tagging["per_label"].items()
        ),
    ]


def _neighbour_line(name: str, figures: dict[str, Any]) -> str:
    if figures.get("neighbour_share") is None:
        return f"  {name}: not measured: {figures['reason']}"
    return (
        f"  {name}: {figures['neighbour_share']} (chance {figures['chance_share']}), "
        f"{figures['num_products']} products, k={figures['k']}"
    )


def _cell(value: float | None) -> str:
    return f"{'n/a' if value is None else value:>7}"
