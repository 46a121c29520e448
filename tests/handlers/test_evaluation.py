from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from handlers.base import Segmentation
from handlers.evaluation import (
    MaskScorer,
    MaskTruth,
    average_precision,
    chance_share,
    f1_scores,
    macro_f1,
    mask_ious,
    neighbour_figures,
    neighbour_share,
)


def _square(
    top: int, left: int, size: int = 4, shape: tuple[int, int] = (12, 12)
) -> npt.NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def _result(
    masks: list[npt.NDArray[np.bool_]], scores: list[float], classes: list[str]
) -> Segmentation:
    return Segmentation(
        pred_masks=np.stack(masks) if masks else np.zeros((0, 12, 12), dtype=bool),
        mask_scores=np.asarray(scores, dtype=np.float32),
        pred_boxes=np.zeros((len(masks), 4), dtype=np.float32),
        pred_classes=classes,
    )


def _truth(
    masks: list[npt.NDArray[np.bool_]], classes: list[str], **crowd: npt.NDArray[np.bool_]
) -> MaskTruth:
    regions: dict[str, npt.NDArray[np.bool_]] = {}
    for mask, name in zip(masks, classes, strict=True):
        regions[name] = regions.get(name, np.zeros_like(mask)) | mask
    return MaskTruth(
        instance_masks=np.stack(masks) if masks else np.zeros((0, 12, 12), dtype=bool),
        instance_classes=classes,
        class_regions=regions,
        crowd_regions=crowd,
    )


def test_average_precision_is_1_when_every_truth_ranks_first() -> None:
    ap = average_precision([0.9, 0.8, 0.1], [True, True, False], num_truths=2)

    assert ap == pytest.approx(1.0)


def test_a_false_positive_ranked_first_halves_the_average_precision() -> None:
    ap = average_precision([0.9, 0.8], [False, True], num_truths=1)

    assert ap == pytest.approx(0.5)


def test_a_missed_truth_caps_the_average_precision_at_its_recall() -> None:
    ap = average_precision([0.9], [True], num_truths=2)

    assert ap == pytest.approx(51 / 101)


def test_mask_ious_of_halves_and_the_whole() -> None:
    left = np.zeros((1, 4, 4), dtype=bool)
    left[0, :, :2] = True
    whole = np.ones((1, 4, 4), dtype=bool)

    ious = mask_ious(np.concatenate([left, whole]), whole)

    assert ious[:, 0].tolist() == pytest.approx([0.5, 1.0])


def test_exact_masks_score_ap50_and_iou_of_1() -> None:
    scorer = MaskScorer(["jeans", "shoes"], score_threshold=0.5)
    truth = [_square(0, 0), _square(6, 6)]

    scorer.add(_result(truth, [0.9, 0.8], ["jeans", "shoes"]), _truth(truth, ["jeans", "shoes"]))
    figures = scorer.figures()

    assert figures["map50"] == pytest.approx(1.0)
    assert figures["mean_iou"] == pytest.approx(1.0)
    assert figures["classes"]["jeans"] == {
        "num_truths": 1,
        "ap50": 1.0,
        "iou": 1.0,
        "iou_images": 1,
    }


def test_disjoint_masks_score_ap50_and_iou_of_0() -> None:
    scorer = MaskScorer(["jeans"], score_threshold=0.5)

    scorer.add(_result([_square(0, 0)], [0.9], ["jeans"]), _truth([_square(6, 6)], ["jeans"]))
    figures = scorer.figures()

    assert figures["classes"]["jeans"]["ap50"] == 0.0
    assert figures["classes"]["jeans"]["iou"] == 0.0


def test_a_mask_of_a_class_the_photo_lacks_counts_as_iou_0() -> None:
    scorer = MaskScorer(["jeans", "shoes"], score_threshold=0.5)
    jeans = _square(0, 0)

    scorer.add(_result([jeans], [0.9], ["jeans"]), _truth([jeans], ["jeans"]))
    scorer.add(_result([jeans], [0.9], ["shoes"]), _truth([], []))
    figures = scorer.figures()

    assert figures["classes"]["shoes"] == {
        "num_truths": 0,
        "ap50": None,
        "iou": 0.0,
        "iou_images": 1,
    }
    assert figures["mean_iou"] == pytest.approx(1.0)  # shoes has no truth, so no say
    assert figures["num_images"] == 2


def test_iou_counts_only_masks_at_the_score_threshold_while_ap_ranks_them_all() -> None:
    scorer = MaskScorer(["jeans"], score_threshold=0.5)
    jeans = _square(0, 0)

    scorer.add(_result([jeans], [0.2], ["jeans"]), _truth([jeans], ["jeans"]))
    figures = scorer.figures()

    assert figures["classes"]["jeans"]["ap50"] == pytest.approx(1.0)
    assert figures["classes"]["jeans"]["iou"] == 0.0


def test_a_prediction_inside_a_crowd_region_is_neither_right_nor_wrong() -> None:
    scorer = MaskScorer(["shoes"], score_threshold=0.5)
    shoe, crowd = _square(0, 0), _square(6, 6, size=6)

    scorer.add(
        _result([_square(7, 7), shoe], [0.9, 0.8], ["shoes", "shoes"]),
        _truth([shoe], ["shoes"], shoes=crowd),
    )

    assert scorer.figures()["classes"]["shoes"]["ap50"] == pytest.approx(1.0)


def test_macro_f1_weighs_each_label_the_same() -> None:
    truth = np.array([[1, 1], [1, 0], [0, 0], [1, 0]], dtype=bool)
    predicted = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], dtype=bool)

    micro, per_label = f1_scores(truth, predicted, ["bag", "hat"])

    # bag: tp 3, fp 1, fn 0, F1 6/7; hat: tp 0, fn 1, F1 0; micro: tp 3, fp 1, fn 1.
    assert per_label["bag"]["f1"] == pytest.approx(6 / 7, abs=1e-4)
    assert macro_f1(per_label) == pytest.approx(3 / 7, abs=1e-4)
    assert micro == pytest.approx(6 / 8)


def test_neighbours_in_separate_clusters_all_share_the_label() -> None:
    embeddings = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], dtype=np.float32)

    figures = neighbour_figures(embeddings, ["dress", "dress", "shoes", "shoes"], k=1)

    assert figures["neighbour_share"] == 1.0
    assert figures["chance_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert figures["label_counts"] == {"dress": 2, "shoes": 2}


def test_neighbour_share_averages_the_share_of_each_products_neighbours() -> None:
    # Points on a line: the two nearest of each are its neighbours on either side or beyond.
    angles = np.array([0.0, 0.1, 0.2, 1.0])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = ["a", "a", "b", "b"]

    share = neighbour_share(embeddings, labels, k=2)

    # 0: neighbours 1 (a), 2 (b); 1: 0 (a), 2 (b); 2: 1 (a), 0 (a); 3: 2 (b), 1 (a).
    assert share == pytest.approx((0.5 + 0.5 + 0.0 + 0.5) / 4)


def test_chance_share_is_the_chance_that_another_product_shares_the_label() -> None:
    share = chance_share(["a", "a", "a", "b"])

    assert share == pytest.approx((3 * 2) / (4 * 3))


def test_neighbours_of_a_single_product_are_refused() -> None:
    with pytest.raises(ValueError, match="2 or more"):
        neighbour_share(np.ones((1, 2), dtype=np.float32), ["a"], k=5)
