from __future__ import annotations

import numpy as np

from handlers.training.segmenter import (
    MERGE_RADIUS,
    TrainingExample,
    garment_instances,
    make_sample,
)


def test_nearby_regions_merge_and_tiny_ones_are_dropped() -> None:
    labels = np.zeros((100, 100), dtype=np.int64)
    labels[10:60, 10:20] = 1
    labels[10:60, 20 + MERGE_RADIUS : 30 + MERGE_RADIUS] = 1
    labels[90:92, 90:92] = 1
    labels[70:90, 10:40] = 2

    instance_map, instance_labels = garment_instances(labels, min_area=10)

    assert instance_labels.tolist() == [1, 2]
    assert set(np.unique(instance_map).tolist()) == {0, 1, 2}
    assert instance_map[91, 91] == 0


def test_distant_regions_of_one_class_are_separate_instances() -> None:
    labels = np.zeros((100, 200), dtype=np.int64)
    labels[10:60, 10:40] = 3
    labels[10:60, 150:180] = 3

    _, instance_labels = garment_instances(labels, min_area=10)

    assert instance_labels.tolist() == [3, 3]


def test_a_training_sample_has_one_box_around_each_mask() -> None:
    instance_map = np.zeros((40, 30), dtype=np.uint8)
    instance_map[5:20, 3:9] = 1
    instance_map[25:38, 10:29] = 2
    example = TrainingExample(
        image_id=1,
        image=np.full((40, 30, 3), 128, dtype=np.uint8),
        instance_map=instance_map,
        labels=np.array([1, 4], dtype=np.int64),
    )

    image, target = make_sample(example, np.random.default_rng(0))

    assert image.shape[0] == 3 and image.shape[1:] == target["masks"].shape[1:]
    assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert box.tolist() == [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]
