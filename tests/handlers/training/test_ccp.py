from __future__ import annotations

from pathlib import Path

import numpy as np

from handlers.training import ccp


def test_label_names_start_with_the_background_and_know_jeans(datasets: Path) -> None:
    names = ccp.load_label_names(datasets / "ccp")

    assert len(names) == 59
    assert names[0] == "null"
    assert names[25] == "jeans"


def test_a_pixel_mask_has_the_photos_size(datasets: Path) -> None:
    root = datasets / "ccp"

    mask = ccp.load_pixel_mask(root, 1)

    assert mask.dtype == np.uint8
    assert mask.shape == ccp.load_photo(root, 1).shape[:2]


def test_the_split_keeps_every_seventh_image_for_validation(datasets: Path) -> None:
    split = ccp.split_pixel_annotated(datasets / "ccp")

    assert all(i % 7 == 0 for i in split.validation)
    assert not set(split.train) & set(split.validation)
    assert sorted(split.train + split.validation) == list(range(1, 901))


def test_image_tags_leave_out_the_background(datasets: Path) -> None:
    root = datasets / "ccp"

    tags = ccp.load_image_tags(root, ccp.image_annotated_ids(root)[0])

    assert tags
    assert 0 not in tags
    assert tags == sorted(tags)
