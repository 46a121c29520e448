"""`enrich eval` against the shipped models on a few real photos, and its COCO reading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pycocotools import mask as coco_masks
from typer.testing import CliRunner

from handlers.base import Segmentation
from handlers.evaluation import MaskScorer
from schemas.settings import Settings
from worker.cli import app
from worker.evaluate import (
    CocoAnnotation,
    EvaluationInputError,
    EvaluationOptions,
    annotation_mask,
    coco_photos,
    product_photo_paths,
    read_coco,
    read_products,
    run_evaluation,
)

runner = CliRunner()

LIMIT = 6
PRODUCTS = [
    {"title": "Slim blue denim jeans", "attributes": {"fit": "slim"}, "label": "jeans"},
    {"title": "Straight jeans, washed black", "description": "Five pockets.", "label": "jeans"},
    {"title": "Ripped boyfriend jeans", "attributes": ["denim"], "label": "jeans"},
    {"title": "Leather ankle boots", "description": "Side zip, block heel.", "label": "shoes"},
    {"title": "White canvas sneakers", "label": "shoes"},
    {"title": "Suede loafers in tan", "attributes": {"material": "suede"}, "label": "shoes"},
    {"title": "A leftover line past the limit", "label": "shoes"},
]


@pytest.fixture(scope="module")
def document(datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    products = tmp_path_factory.mktemp("products") / "products.jsonl"
    products.write_text("\n".join(json.dumps(product) for product in PRODUCTS) + "\n")

    result = runner.invoke(
        app,
        [
            *("eval", "--data", str(datasets / "ccp"), "--limit", str(LIMIT), "--json"),
            *("--products", str(products)),
            *("--product-photos", str(datasets / "clothing-small" / "validation")),
        ],
    )

    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout[result.stdout.index("{") :])
    return parsed


def _figures(node: Any) -> Iterator[tuple[str, float]]:
    """Every AP, IoU, F1, precision, recall and share in the document, with its key."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, float) and key != "seconds" and "threshold" not in key:
                yield key, value
            else:
                yield from _figures(value)


def test_eval_counts_as_many_photos_and_products_as_the_limit(document: dict[str, Any]) -> None:
    segmentation, tagging = document["segmentation"], document["tagging"]
    image, text = document["image_embedding"], document["text_embedding"]

    assert segmentation["num_images"] == LIMIT and segmentation["split"] == "validation"
    assert tagging["num_images"] == LIMIT
    assert image["product_photos"]["num_products"] == LIMIT
    assert sum(image["product_photos"]["label_counts"].values()) == LIMIT
    assert 2 <= image["ccp"]["num_products"] <= LIMIT
    assert text["num_products"] == LIMIT


def test_eval_figures_lie_between_0_and_1(document: dict[str, Any]) -> None:
    figures = dict(_figures(document))

    assert {"map50", "mean_iou", "micro_f1", "macro_f1", "neighbour_share"} <= set(figures)
    assert all(0.0 <= value <= 1.0 for value in figures.values()), figures


def test_eval_names_the_models_it_measured(document: dict[str, Any]) -> None:
    versions = document["model_versions"]

    assert versions["segmentation"].startswith("garment-segmenter@")
    assert versions["tagging"] == document["tagging"]["model_version"]
    assert set(document["tagging"]["thresholds"]) == set(document["tagging"]["per_label"])


def test_eval_says_where_the_tagger_thresholds_were_chosen(document: dict[str, Any]) -> None:
    tagging = document["tagging"]

    assert tagging["split"] == "validation"
    if tagging["thresholds_chosen_on"] is not None:
        assert set(tagging["held_out"]) == {"micro_f1", "macro_f1"}


def test_eval_ranks_instances_below_the_worker_threshold_for_ap(document: dict[str, Any]) -> None:
    segmentation = document["segmentation"]

    assert segmentation["ap_score_threshold"] < segmentation["score_threshold"]
    assert segmentation["classes"].keys() >= {"jeans", "pants", "shoes"}


def test_eval_refuses_a_coco_file_without_its_images() -> None:
    result = runner.invoke(app, ["eval", "--coco", "absent.json"])

    assert result.exit_code == 2
    assert "--coco and --images go together" in result.output


def test_eval_refuses_an_unknown_split() -> None:
    result = runner.invoke(app, ["eval", "--split", "training"])

    assert result.exit_code == 2
    assert "--split must be one of validation, all, got 'training'" in result.output


# --- COCO ---------------------------------------------------------------------------------


def _box(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> Any:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _rle(mask: npt.NDArray[np.bool_]) -> dict[str, Any]:
    encoded = coco_masks.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": encoded["counts"].decode(), "size": list(encoded["size"])}


def _uncompressed_rle(mask: npt.NDArray[np.bool_]) -> dict[str, Any]:
    """COCO's plain RLE: run lengths down the columns, starting with a run of zeros."""
    counts, current, run = [], False, 0
    for value in mask.flatten(order="F"):
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = bool(value), 1
    return {"counts": [*counts, run], "size": list(mask.shape)}


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    """Two synthetic photos: dark trousers and a shoe on a light ground, with a hat; one
    polygon, one compressed and one plain RLE, one crowd region."""
    shape = (120, 80)
    pants, shoe = _box(shape, 30, 25, 100, 55), _box(shape, 100, 10, 112, 30)
    hat, crowd = _box(shape, 5, 30, 20, 50), _box(shape, 100, 50, 115, 75)
    for name in ("a.png", "b.png"):
        pixels = np.full((*shape, 3), 235, dtype=np.uint8)
        pixels[pants] = (40, 50, 90)
        pixels[shoe | crowd] = (30, 30, 30)
        Image.fromarray(pixels).save(tmp_path / name)

    polygon = [25.0, 30.0, 55.0, 30.0, 55.0, 100.0, 25.0, 100.0]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [polygon]},
        {"id": 2, "image_id": 1, "category_id": 2, "segmentation": _rle(shoe)},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": _uncompressed_rle(pants)},
        {"id": 4, "image_id": 2, "category_id": 3, "segmentation": _rle(hat)},
        {"id": 5, "image_id": 2, "category_id": 2, "segmentation": _rle(crowd), "iscrowd": 1},
    ]
    coco = {
        "images": [
            {"id": 2, "file_name": "b.png", "height": shape[0], "width": shape[1]},
            {"id": 1, "file_name": "a.png", "height": shape[0], "width": shape[1]},
        ],
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "pants"},
            {"id": 2, "name": "shoes"},
            {"id": 3, "name": "hat"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return tmp_path


def test_polygons_and_both_rle_forms_decode_to_the_same_masks() -> None:
    pants = _box((120, 80), 30, 25, 100, 55)

    def decoded(segmentation: Any) -> Any:
        annotation = CocoAnnotation(id=1, image_id=1, category_id=1, segmentation=segmentation)
        return annotation_mask(annotation, 120, 80)

    polygon = decoded([[25.0, 30.0, 55.0, 30.0, 55.0, 100.0, 25.0, 100.0]])
    assert (decoded(_rle(pants)) == pants).all()
    assert (decoded(_uncompressed_rle(pants)) == pants).all()
    assert (polygon & pants).sum() / (polygon | pants).sum() > 0.95


def test_a_perfect_segmenter_scores_1_on_a_coco_file(coco_folder: Path) -> None:
    coco = read_coco(coco_folder / "coco.json")
    scorer = MaskScorer(["pants", "shoes", "jeans"], score_threshold=0.5)

    photos = list(coco_photos(coco, coco_folder, ["pants", "shoes", "jeans"], 10**7))
    for photo in photos:
        # Every instance, and the crowd regions too, which the ranking then leaves out.
        crowds = photo.truth.crowd_regions
        masks = np.concatenate([photo.truth.instance_masks, *(c[None] for c in crowds.values())])
        perfect = Segmentation(
            pred_masks=masks,
            mask_scores=np.full(len(masks), 0.9, dtype=np.float32),
            pred_boxes=np.zeros((len(masks), 4), dtype=np.float32),
            pred_classes=[*photo.truth.instance_classes, *crowds],
        )
        scorer.add(perfect, photo.truth)
    figures = scorer.figures()

    assert [photo.name for photo in photos] == ["a.png", "b.png"]
    assert [photo.main_label for photo in photos] == ["pants", "pants"]
    assert photos[1].truth.instance_classes == ["pants"]  # the crowd shoe is no instance
    assert figures["map50"] == figures["mean_iou"] == 1.0
    assert figures["classes"]["shoes"]["num_truths"] == 1
    assert figures["classes"]["jeans"]["ap50"] is None


def test_eval_on_a_coco_file_runs_the_worker_segmenter(coco_folder: Path, tmp_path: Path) -> None:
    options = EvaluationOptions(
        data=tmp_path / "no-ccp",
        coco=coco_folder / "coco.json",
        images=coco_folder,
        product_photos=None,
    )

    document = run_evaluation(Settings(), options)

    segmentation = document["segmentation"]
    assert segmentation["dataset"] == "coco" and segmentation["num_images"] == 2
    assert set(segmentation["classes"]) == {"pants", "shoes"}  # hat is not a segmenter class
    assert segmentation["classes"]["pants"]["num_truths"] == 2
    assert all(
        value is None or 0.0 <= value <= 1.0
        for value in (segmentation["map50"], segmentation["mean_iou"])
    )
    assert "no CCP image-level tags" in document["tagging"]["reason"]
    assert document["image_embedding"]["coco"]["num_products"] == 2
    assert document["image_embedding"]["product_photos"]["neighbour_share"] is None
    assert document["text_embedding"]["neighbour_share"] is None
    assert "no labelled product texts" in document["text_embedding"]["reason"]


def test_a_coco_file_without_segmentations_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "coco.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                "categories": [{"id": 1, "name": "pants"}],
            }
        )
    )

    with pytest.raises(EvaluationInputError, match=r"annotations\.0\.segmentation"):
        read_coco(path)


def test_an_image_of_another_size_than_its_coco_entry_is_refused(coco_folder: Path) -> None:
    coco = read_coco(coco_folder / "coco.json")
    coco.images[0].height = 99

    with pytest.raises(EvaluationInputError, match=r"is 120x80 .* says 99x80"):
        list(coco_photos(coco, coco_folder, ["pants"], 10**7))


# --- Products -----------------------------------------------------------------------------


def test_a_product_line_without_a_label_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "products.jsonl"
    path.write_text('{"title": "Jeans", "label": "jeans"}\n{"title": "Boots"}\n')

    with pytest.raises(EvaluationInputError, match=r"line 2 .*label"):
        read_products(path)


def test_product_photos_are_taken_from_each_label_in_turn(tmp_path: Path) -> None:
    for label, count in (("dress", 3), ("hat", 1), ("shoes", 2)):
        (tmp_path / label).mkdir()
        for i in range(count):
            (tmp_path / label / f"{i}.jpg").touch()
    (tmp_path / "README.md").touch()

    paths = product_photo_paths(tmp_path)

    assert [f"{p.parent.name}/{p.name}" for p in paths] == [
        "dress/0.jpg", "hat/0.jpg", "shoes/0.jpg", "dress/1.jpg", "shoes/1.jpg", "dress/2.jpg",
    ]  # fmt: skip
