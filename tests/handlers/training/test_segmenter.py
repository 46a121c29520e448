from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.base import ModelLoadError, model_version
from handlers.training.segmenter import (
    MERGE_RADIUS,
    MODEL_NAME,
    TrainingExample,
    _new_model,
    _write_model,
    garment_instances,
    load_initial_weights,
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


def test_training_continues_from_a_saved_folder_with_its_weights(tmp_path: Path) -> None:
    saved = _new_model(96)
    _write_model(saved, tmp_path / "before", image_size=96, score_threshold=0.4)
    fresh = _new_model(96)

    version = load_initial_weights(fresh, tmp_path / "before")

    assert version == model_version(MODEL_NAME, tmp_path / "before")
    for name, tensor in fresh.state_dict().items():
        expected = saved.state_dict()[name]
        if tensor.is_floating_point():
            expected = expected.half().float()
        assert torch.equal(tensor, expected), name


def test_training_refuses_to_continue_from_a_folder_of_other_classes(tmp_path: Path) -> None:
    _write_model(_new_model(96), tmp_path / "other", image_size=96, score_threshold=0.4)
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["classes"] = ["jeans", "hat"]
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelLoadError, match=r"classes \['jeans', 'hat'\]"):
        load_initial_weights(_new_model(96), tmp_path / "other")
