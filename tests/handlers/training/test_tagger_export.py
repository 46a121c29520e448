"""Tagger exports that load on other Python releases: no function copied as bytecode."""

from __future__ import annotations

import shutil
from pathlib import Path

import cloudpickle
import numpy as np
import torch

from handlers.tagging import CONFIG_FILE, EXPORT_FILE, Tagger, TaggerConfig, load_tagger_learner
from handlers.training.tagger import reexport_tagger
from schemas.settings import REPO_ROOT
from tests.handlers.test_tagging import _functions_as_bytecode

SHIPPED_TAGGER = REPO_ROOT / "models" / "tagger"


def test_reexport_writes_fastais_default_export_again_without_bytecode_and_the_same_tags(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "tagger"
    shutil.copytree(SHIPPED_TAGGER, folder)
    config = TaggerConfig.model_validate_json((folder / CONFIG_FILE).read_text())
    learner = load_tagger_learner(folder, config, torch.device("cpu"))
    learner.path = folder
    learner.export(EXPORT_FILE, pickle_module=cloudpickle)  # fastai's default, as notebooks do
    photos = [
        np.random.default_rng(seed).integers(0, 255, (64, 48, 3), np.uint8) for seed in (1, 2)
    ]
    before = Tagger(model_dir=folder, device="cpu").tag(photos)
    bytecode_before = _functions_as_bytecode(folder / EXPORT_FILE)

    reexport_tagger(folder)

    after = Tagger(model_dir=folder, device="cpu").tag(photos)
    assert bytecode_before > 0
    assert _functions_as_bytecode(folder / EXPORT_FILE) == 0
    assert [tags.scores for tags in after] == [tags.scores for tags in before]
