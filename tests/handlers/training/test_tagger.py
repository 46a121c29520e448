from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handlers.training.ccp import load_label_names
from handlers.training.tagger import (
    PhotoTags,
    choose_labels,
    f1_scores,
    is_validation_photo,
    label_priors,
)


def test_every_fifth_id_is_a_validation_photo() -> None:
    photos = [Path(f"photos/{image_id:04d}.jpg") for image_id in range(1005, 1011)]

    validation = [photo.stem for photo in photos if is_validation_photo(photo)]

    assert validation == ["1005", "1010"]


def test_labels_are_chosen_by_training_counts_without_body_parts() -> None:
    tags = {1001: ["skin", "jeans", "bag"], 1002: ["skin", "jeans"], 1005: ["bag", "bag"]}

    labels = choose_labels(tags, min_count=2)

    assert labels == ["jeans"]


def test_priors_are_the_share_of_training_photos_with_each_label() -> None:
    tags = {1001: ["jeans", "bag"], 1002: ["jeans"], 1003: [], 1005: ["bag"]}

    priors = label_priors(tags, ["bag", "jeans"])

    np.testing.assert_allclose(priors, [1 / 3, 2 / 3], rtol=1e-6)


def test_micro_f1_pools_counts_and_per_label_f1_keeps_them_apart() -> None:
    truth = np.array([[True, False], [True, True], [False, False]])
    predicted = np.array([[True, True], [False, True], [False, False]])

    micro, per_label = f1_scores(truth, predicted, ["jeans", "bag"])

    assert micro == pytest.approx(2 * 2 / (2 * 2 + 1 + 1), abs=1e-4)
    assert per_label["jeans"] == {"f1": 0.6667, "precision": 1.0, "recall": 0.5, "support": 2}
    assert per_label["bag"]["precision"] == 0.5


def test_photo_tags_keep_only_the_chosen_labels(datasets: Path) -> None:
    names = tuple(load_label_names(datasets / "ccp"))
    get_y = PhotoTags(label_names=names, labels=frozenset({"blouse", "skirt", "jeans"}))

    labels = get_y(datasets / "ccp" / "photos" / "1005.jpg")

    assert labels == ["blouse", "skirt"]
