from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import fastai
import numpy as np
import pytest
import torch
from fastai.data.block import DataBlock, MultiCategoryBlock
from fastai.data.transforms import IndexSplitter
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat
from fastai.vision.augment import Resize
from fastai.vision.data import ImageBlock
from PIL import Image
from structlog.testing import capture_logs
from torch import nn

from handlers.base import ModelLoadError, StageError
from handlers.tagging import CONFIG_FILE, EXPORT_FILE, ExportVersions, Tagger, TaggerConfig
from handlers.training.ccp import load_photo
from schemas.settings import REPO_ROOT

SHIPPED_TAGGER = REPO_ROOT / "models" / "tagger"

JEANS_PHOTO = 1940
"""A validation photo (id divisible by 5) whose CCP tags include jeans."""


@pytest.fixture(scope="session")
def tagger() -> Tagger:
    return Tagger(model_dir=SHIPPED_TAGGER, device="cpu")


@pytest.fixture(scope="session")
def jeans_photo(datasets: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return load_photo(datasets / "ccp", JEANS_PHOTO)


def test_the_shipped_tagger_finds_jeans_on_a_validation_photo_of_jeans(
    tagger: Tagger, jeans_photo: np.ndarray[Any, np.dtype[np.uint8]]
) -> None:
    (tags,) = tagger.tag([jeans_photo])

    kept = [label.label for label in tags.labels]
    assert "jeans" in kept, "jeans scored under its calibrated threshold"


def test_tags_hold_a_probability_for_every_label_and_sort_the_kept_ones(
    tagger: Tagger, jeans_photo: np.ndarray[Any, np.dtype[np.uint8]]
) -> None:
    (tags,) = tagger.tag([jeans_photo])

    kept_scores = [label.score for label in tags.labels]
    assert sorted(tags.scores) == sorted(tagger.labels)
    assert all(0.0 <= score <= 1.0 for score in tags.scores.values())
    assert kept_scores == sorted(kept_scores, reverse=True)
    assert all(label.score > tagger.thresholds[label.label] for label in tags.labels)


def test_a_batch_scores_each_image_as_if_it_were_alone(
    tagger: Tagger, jeans_photo: np.ndarray[Any, np.dtype[np.uint8]]
) -> None:
    flipped = np.ascontiguousarray(jeans_photo[:, ::-1])
    alone = np.concatenate([tagger.predict_scores([image]) for image in (jeans_photo, flipped)])

    batch = tagger.predict_scores([jeans_photo, flipped])

    assert batch.shape == (2, len(tagger.labels))
    np.testing.assert_allclose(batch, alone, atol=1e-4)


def test_an_image_that_is_not_rgb_is_a_stage_error(tagger: Tagger) -> None:
    grey = np.zeros((32, 32), dtype=np.uint8)

    with pytest.raises(StageError) as caught:
        tagger.tag([grey])

    assert "(32, 32)" in caught.value.reason


def test_thresholds_are_read_from_tagger_json(
    tmp_path: Path, jeans_photo: np.ndarray[Any, np.dtype[np.uint8]]
) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    config = TaggerConfig.read(folder / CONFIG_FILE)
    thresholds = {label: 0.999 if label == "jeans" else 0.001 for label in config.labels}
    config.model_copy(update={"thresholds": thresholds}).write(folder / CONFIG_FILE)

    (tags,) = Tagger(model_dir=folder, device="cpu").tag([jeans_photo])

    kept = {label.label for label in tags.labels}
    assert "jeans" not in kept
    assert kept == {label for label, score in tags.scores.items() if score > 0.001} - {"jeans"}


@pytest.mark.parametrize(
    ("package", "exported_version"),
    [("fastai", "2.7.0"), ("torch", "2.0.1"), ("python", "3.9.18")],
)
def test_a_version_mismatch_logs_a_warning_naming_both_versions(
    tmp_path: Path, package: str, exported_version: str
) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["versions"][package] = exported_version
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    with capture_logs() as logs:
        Tagger(model_dir=folder, device="cpu")

    (warning,) = [entry for entry in logs if entry["event"] == "model_version_mismatch"]
    assert warning["log_level"] == "warning"
    assert warning["package"] == package
    assert warning["exported_version"] == exported_version
    assert warning["installed_version"] == getattr(ExportVersions.installed(), package)


def test_a_local_build_tag_or_python_patch_release_is_no_mismatch(tmp_path: Path) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    installed = ExportVersions.installed()
    config["versions"]["torch"] = installed.torch.split("+")[0] + "+cpu"
    config["versions"]["python"] = ".".join(installed.python.split(".")[:2]) + ".99"
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    with capture_logs() as logs:
        Tagger(model_dir=folder, device="cpu")

    assert [entry for entry in logs if entry["event"] == "model_version_mismatch"] == []


def test_a_function_missing_from_main_is_a_model_load_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main_module = sys.modules["__main__"]
    label_func = _notebook_function("notebook_label_func")
    monkeypatch.setattr(main_module, "notebook_label_func", label_func, raising=False)
    # Older fastai exported with pickle, which refers to __main__'s functions by name.
    _export_tiny_tagger(tmp_path, label_func, pickle_module=pickle)
    monkeypatch.delattr(main_module, "notebook_label_func")

    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=tmp_path, device="cpu")

    message = str(caught.value)
    assert "'notebook_label_func'" in message
    assert "looked up in __main__" in message
    assert f"function_modules in {tmp_path / CONFIG_FILE}" in message


def test_a_function_module_the_worker_cannot_import_is_a_model_load_error_naming_it(
    tmp_path: Path,
) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    config = TaggerConfig.read(folder / CONFIG_FILE)
    update = {"function_modules": ["shop_notebooks.tagging"]}
    config.model_copy(update=update).write(folder / CONFIG_FILE)

    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=folder, device="cpu")

    message = str(caught.value)
    assert "'shop_notebooks.tagging' in function_modules" in message
    assert "ModuleNotFoundError" in message


def test_function_modules_must_be_dotted_module_names() -> None:
    with pytest.raises(ValueError, match="function_modules"):
        TaggerConfig(
            name="tiny",
            labels=["a"],
            thresholds={"a": 0.2},
            image_size=8,
            versions=ExportVersions.installed(),
            function_modules=["notebooks/tagging.py"],
        )


def test_a_removed_module_is_a_model_load_error_naming_the_function_and_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _throwaway_module(tmp_path, monkeypatch, "throwaway_labels")
    _export_tiny_tagger(tmp_path / "tagger", module.label_func)
    (tmp_path / "throwaway_labels.py").unlink()
    monkeypatch.delitem(sys.modules, "throwaway_labels")
    importlib.invalidate_caches()

    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=tmp_path / "tagger", device="cpu")

    assert "'label_func'" in str(caught.value)
    assert "'throwaway_labels'" in str(caught.value)


def test_a_corrupt_export_is_a_model_load_error_with_its_cause(tmp_path: Path) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    (folder / EXPORT_FILE).write_bytes(b"not a pickle")

    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=folder, device="cpu")

    message = str(caught.value)
    assert "cannot unpickle" in message
    assert f"exported with fastai {fastai.__version__}" in message
    assert caught.value.__cause__ is not None


def test_an_export_that_is_not_a_learner_is_a_model_load_error(tmp_path: Path) -> None:
    folder = _copy_of_shipped_tagger(tmp_path)
    torch.save({"weights": torch.zeros(2)}, folder / EXPORT_FILE)

    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=folder, device="cpu")

    assert f"cannot unpickle tagger export {folder / EXPORT_FILE}" in str(caught.value)


def test_a_folder_without_tagger_json_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        Tagger(model_dir=tmp_path, device="cpu")

    assert CONFIG_FILE in str(caught.value)


def test_thresholds_must_name_every_label() -> None:
    with pytest.raises(ValueError, match="missing=\\['b'\\]"):
        TaggerConfig(
            name="tiny",
            labels=["a", "b"],
            thresholds={"a": 0.2},
            image_size=8,
            versions=ExportVersions.installed(),
        )


def _copy_of_shipped_tagger(tmp_path: Path) -> Path:
    folder = tmp_path / "tagger"
    folder.mkdir()
    for name in (EXPORT_FILE, CONFIG_FILE):
        shutil.copy(SHIPPED_TAGGER / name, folder / name)
    return folder


def _notebook_function(name: str) -> Callable[[Path], Any]:
    """A function that claims to come from __main__, as one defined in a notebook does."""

    # Returns Any: fasttransform casts to a get_y's return annotation and fails on list[str].
    def label_func(path: Path) -> Any:
        return ["a"] if path.stem.endswith("0") else ["b"]

    label_func.__module__ = "__main__"
    label_func.__qualname__ = label_func.__name__ = name
    return label_func


def _throwaway_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    source = "def label_func(path):\n    return ['a'] if path.stem.endswith('0') else ['b']\n"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def _export_tiny_tagger(
    folder: Path, label_func: Callable[[Path], Any], pickle_module: Any = None
) -> None:
    """A two-label learner on four 8x8 photos whose get_y is `label_func`, and its config."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (8, 8), (60 * index, 0, 0)).save(photos / f"{index}0{index}.png")
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=["a", "b"])),
        get_y=label_func,
        splitter=IndexSplitter([0]),
        item_tfms=Resize(8),
    )
    loaders = block.dataloaders(sorted(photos.iterdir()), bs=2, num_workers=0)
    # Body then head, as fastai's vision_learner builds them.
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    model = nn.Sequential(
        body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    )
    learner = Learner(loaders, model, loss_func=BCEWithLogitsLossFlat(), path=folder)

    if pickle_module is None:
        learner.export(EXPORT_FILE)
    else:
        learner.export(EXPORT_FILE, pickle_module=pickle_module)
    TaggerConfig(
        name="tiny",
        labels=["a", "b"],
        thresholds={"a": 0.5, "b": 0.5},
        image_size=8,
        versions=ExportVersions.installed(),
    ).write(folder / CONFIG_FILE)


def test_a_one_pixel_image_is_tagged_without_error(tagger: Tagger) -> None:
    tiny = np.full((1, 1, 3), 128, dtype=np.uint8)

    (tags,) = tagger.tag([tiny])

    assert set(tags.scores) == set(tagger.labels)


def test_tag_and_embed_gives_the_tags_of_tag_and_one_unit_vector_per_image(
    tagger: Tagger, jeans_photo: np.ndarray[Any, np.dtype[np.uint8]]
) -> None:
    flipped = np.ascontiguousarray(jeans_photo[:, ::-1])

    tags, embeddings = tagger.tag_and_embed([jeans_photo, flipped])

    assert embeddings.shape == (2, 1280)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    alone = tagger.tag([jeans_photo, flipped])
    assert [[label.label for label in t.labels] for t in tags] == [
        [label.label for label in t.labels] for t in alone
    ]
    for embedded_tags, tagged in zip(tags, alone, strict=True):
        assert embedded_tags.scores == pytest.approx(tagged.scores, abs=1e-5)


def test_tag_and_embed_of_no_images_gives_an_empty_d_wide_array(tagger: Tagger) -> None:
    tags, embeddings = tagger.tag_and_embed([])

    assert tags == []
    assert embeddings.shape == (0, tagger.feature_dimension)


# A fresh process loads a tagger folder as the worker does, and prints the outcome as JSON.
LOAD_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path

import numpy as np

from handlers.base import ModelLoadError
from handlers.tagging import Tagger

try:
    tagger = Tagger(model_dir=Path(sys.argv[1]), device="cpu")
except ModelLoadError as error:
    print(json.dumps({"error": str(error)}))
else:
    (tags,) = tagger.tag([np.full((8, 8, 3), 200, dtype=np.uint8)])
    print(json.dumps({"scores": tags.scores}))
"""


@pytest.fixture(scope="module")
def notebook_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder tests/handlers/tagger_notebook.py, run as a script, exports into."""
    out_dir = tmp_path_factory.mktemp("notebook")
    script = REPO_ROOT / "tests" / "handlers" / "tagger_notebook.py"

    subprocess.run([sys.executable, str(script), str(out_dir)], env=_subprocess_env(), check=True)
    return out_dir


def test_a_notebook_export_by_fastais_default_loads_and_tags_in_a_fresh_process(
    notebook_exports: Path,
) -> None:
    outcome = _load_in_a_fresh_process(notebook_exports / "cloudpickle")

    assert set(outcome["scores"]) == {"dark", "light"}


def test_a_notebook_export_by_pickle_fails_in_a_fresh_process_naming_the_function(
    notebook_exports: Path,
) -> None:
    outcome = _load_in_a_fresh_process(notebook_exports / "pickle")

    message = outcome["error"]
    assert "function or class 'get_y', looked up in __main__" in message
    assert f"function_modules in {notebook_exports / 'pickle' / CONFIG_FILE}" in message
    assert "Traceback" not in message


def test_a_notebook_export_by_pickle_loads_in_a_fresh_process_from_function_modules(
    notebook_exports: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "pickle"
    shutil.copytree(notebook_exports / "pickle", folder)
    config = TaggerConfig.read(folder / CONFIG_FILE)
    update = {"function_modules": ["tests.handlers.tagger_notebook"]}
    config.model_copy(update=update).write(folder / CONFIG_FILE)

    outcome = _load_in_a_fresh_process(folder)

    same_learner = Tagger(model_dir=notebook_exports / "cloudpickle", device="cpu")
    (tags,) = same_learner.tag([np.full((8, 8, 3), 200, dtype=np.uint8)])
    assert outcome["scores"] == pytest.approx(tags.scores)


def _load_in_a_fresh_process(folder: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(folder)],
        env=_subprocess_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _functions_as_bytecode(export: Path) -> int:
    """How many functions cloudpickle would rebuild from bytecode when loading `export`."""
    import cloudpickle.cloudpickle as cloudpickle_module

    rebuilt = []
    make_function = cloudpickle_module._make_function

    def counting(*args: Any) -> Any:
        rebuilt.append(args[2])
        return make_function(*args)

    cloudpickle_module._make_function = counting
    try:
        torch.load(export, map_location="cpu", weights_only=False)
    finally:
        cloudpickle_module._make_function = make_function
    return len(rebuilt)


def test_the_shipped_export_holds_no_python_bytecode() -> None:
    rebuilt = _functions_as_bytecode(SHIPPED_TAGGER / EXPORT_FILE)

    assert rebuilt == 0


def test_an_export_with_bytecode_of_another_python_is_a_model_load_error(
    notebook_exports: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "tagger"
    shutil.copytree(notebook_exports / "cloudpickle", folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["versions"]["python"] = "3.10.14"
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    with pytest.raises(ModelLoadError) as raised:
        Tagger(model_dir=folder, device="cpu")

    assert "bytecode of Python 3.10" in str(raised.value)
    assert "--reexport" in str(raised.value)
