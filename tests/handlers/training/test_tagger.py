from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.tagging import CONFIG_FILE, ExportVersions, Tagger, TaggerConfig
from handlers.training.ccp import load_label_names
from handlers.training.tagger import (
    DEFAULT_THRESHOLD,
    MODEL_CARD_FILE,
    VALIDATION_PHOTOS,
    PhotoTags,
    best_thresholds,
    calibrate,
    choose_labels,
    f1_scores,
    is_validation_photo,
    label_priors,
    main,
    replace_section,
    train_tagger,
)
from schemas.settings import REPO_ROOT

SHIPPED_TAGGER = REPO_ROOT / "models" / "tagger"


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


def test_each_label_gets_the_middle_of_its_best_f1_thresholds() -> None:
    truth = np.array([[True], [True], [True], [False], [False], [False]])
    scores = np.array([[0.605], [0.7], [0.8], [0.1], [0.3], [0.455]], dtype=np.float32)

    thresholds = best_thresholds(truth, scores, ["jeans"], floor=0.05, min_support=1)

    # Every threshold from 0.46 to 0.60 separates the photos; 0.53 is their middle.
    assert thresholds == {"jeans": 0.53}


def test_no_threshold_is_below_the_floor() -> None:
    truth = np.array([[True], [True], [True], [False], [False]])
    scores = np.array([[0.03], [0.06], [0.07], [0.01], [0.02]], dtype=np.float32)

    thresholds = best_thresholds(truth, scores, ["belt"], floor=0.05, min_support=1)

    assert thresholds == {"belt": 0.05}


def test_a_label_without_positives_keeps_the_default_threshold() -> None:
    truth = np.array([[True, False], [False, False], [True, False], [False, False]])
    scores = np.array([[0.9, 0.8], [0.1, 0.1], [0.8, 0.3], [0.2, 0.6]], dtype=np.float32)

    calibration = calibrate(
        truth, scores, ["bag", "wallet"], halves=np.array([0, 1, 0, 1]), photos="four photos"
    )

    assert calibration.labels["wallet"].best_threshold is None
    assert calibration.labels["wallet"].threshold == DEFAULT_THRESHOLD
    assert calibration.labels["bag"].best_threshold is not None


def test_shrinkage_draws_a_rare_label_towards_the_default_threshold() -> None:
    truth = np.array([[True], [True], [True], [False], [False], [False]])
    scores = np.array([[0.605], [0.7], [0.8], [0.1], [0.3], [0.455]], dtype=np.float32)
    halves = np.array([0, 1, 0, 1, 0, 1])

    bare = calibrate(truth, scores, ["jeans"], halves=halves, photos="six", shrinkage=0)
    drawn = calibrate(truth, scores, ["jeans"], halves=halves, photos="six", shrinkage=1)

    assert bare.labels["jeans"].threshold == 0.53
    # Three positives and one pseudo-photo at 0.2: (3 * 0.53 + 0.2) / 4 = 0.4475.
    assert drawn.labels["jeans"].threshold == 0.45


def test_held_out_figures_score_each_half_at_the_other_halfs_thresholds() -> None:
    # Half 0 separates at 0.5-0.9 and half 1 at 0.1-0.5: each half's threshold misleads the other.
    truth = np.array([[True], [True], [False], [False]] * 2)
    scores = np.array([[0.9], [0.9], [0.5], [0.5], [0.5], [0.5], [0.1], [0.1]], dtype=np.float32)
    halves = np.array([0, 0, 0, 0, 1, 1, 1, 1])

    calibration = calibrate(truth, scores, ["hat"], halves=halves, photos="eight", shrinkage=0)

    # Half 0 at half 1's 0.3: 2 right, 2 false alarms; half 1 at half 0's 0.7: 2 missed.
    assert calibration.held_out.micro_f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))
    assert calibration.after.micro_f1 > calibration.held_out.micro_f1


def test_a_new_thresholds_section_replaces_the_old_one_and_keeps_the_rest() -> None:
    card = "# Tagger\n\n## Validation\n\nF1.\n\n## Thresholds\n\nold\n\n## Limitations\n\nFew.\n"

    replaced = replace_section(card, ["## Thresholds", "", "new", ""])

    assert (
        replaced
        == "# Tagger\n\n## Validation\n\nF1.\n\n## Thresholds\n\nnew\n\n## Limitations\n\nFew.\n"
    )


def test_a_card_without_thresholds_gets_them_before_its_limitations() -> None:
    card = "# Tagger\n\n## Validation\n\nF1.\n\n## Limitations\n\nFew.\n"

    replaced = replace_section(card, ["## Thresholds", "", "new", ""])

    assert replaced.index("## Validation") < replaced.index("new") < replaced.index("## Limit")


def test_calibrate_only_writes_per_label_thresholds_and_figures_into_a_tagger_folder(
    tmp_path: Path, datasets: Path
) -> None:
    folder = tmp_path / "tagger"
    shutil.copytree(SHIPPED_TAGGER, folder)
    version_before = Tagger(model_dir=folder, device="cpu").model_version

    arguments = ["--calibrate-only", "--out", str(folder), "--data", str(datasets / "ccp")]
    main([*arguments, "--max-images", "60", "--threshold-floor", "0.1"])

    config = TaggerConfig.read(folder / CONFIG_FILE)
    assert config.calibration is not None
    assert config.calibration.num_images == 12
    assert config.calibration.floor == 0.1
    assert config.thresholds == {
        label: calibrated.threshold for label, calibrated in config.calibration.labels.items()
    }
    assert all(0.1 <= threshold < 1.0 for threshold in config.thresholds.values())
    card = (folder / MODEL_CARD_FILE).read_text()
    assert card.count("## Thresholds") == 1
    assert f"calibrated on the 12 {VALIDATION_PHOTOS}" in card
    tagger = Tagger(model_dir=folder, device="cpu")
    assert tagger.thresholds == config.thresholds
    assert tagger.model_version != version_before


def test_training_records_the_versions_and_calibrates_the_thresholds_after_training(
    tmp_path: Path, datasets: Path
) -> None:
    threads = torch.get_num_threads()

    try:
        report = train_tagger(
            datasets / "ccp",
            tmp_path,
            epochs=1,
            freeze_epochs=1,
            image_size=64,
            seed=0,
            batch_size=8,
            min_label_count=5,
            max_images=40,
        )
    finally:
        torch.set_num_threads(threads)

    config = TaggerConfig.read(tmp_path / CONFIG_FILE)
    assert config.versions == ExportVersions.installed()
    assert config.calibration is not None
    assert config.calibration.model_dump() == report["calibration"]
    assert config.thresholds == {
        label: calibrated.threshold for label, calibrated in config.calibration.labels.items()
    }
    card = (tmp_path / MODEL_CARD_FILE).read_text()
    assert card.index("## Validation") < card.index("## Thresholds") < card.index("## Limit")
