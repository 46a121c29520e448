from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.backbones import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    _pair_in_order,
    efficientnet_lite0,
    efficientnet_lite0_weights_path,
)
from handlers.base import ModelLoadError
from handlers.training import ccp

IMAGENET_JEAN = 608
PHOTO_OF_JEANS = 84
"""A CCP validation photo of a person in blue jeans, full length."""


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return efficientnet_lite0(pretrained=True).eval()


def test_pretrained_weights_are_the_shipped_checkpoint_in_order(
    backbone: torch.nn.Module,
) -> None:
    shipped = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)

    loaded = backbone.state_dict()

    assert len(loaded) == len(shipped)
    for ours, theirs in zip(loaded.values(), shipped.values(), strict=True):
        assert torch.equal(ours, theirs)


def test_batch_norm_statistics_are_loaded(backbone: torch.nn.Module) -> None:
    untrained = efficientnet_lite0(pretrained=False)

    running_var = backbone.state_dict()["bn2.running_var"]

    assert torch.equal(untrained.state_dict()["bn2.running_var"], torch.ones_like(running_var))
    assert not torch.allclose(running_var, torch.ones_like(running_var))


def test_a_photo_of_jeans_is_top_1_jean_in_imagenet(
    backbone: torch.nn.Module, datasets: Path
) -> None:
    photo = ccp.load_photo(datasets / "ccp", PHOTO_OF_JEANS)
    pixels = np.asarray(Image.fromarray(photo).resize((224, 336), Image.Resampling.BILINEAR))
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(EFFICIENTNET_LITE0_MEAN)[:, None, None]
    std = torch.tensor(EFFICIENTNET_LITE0_STD)[:, None, None]

    with torch.inference_mode():
        scores = backbone(((image - mean) / std)[None]).softmax(dim=1)[0]

    assert int(scores.argmax()) == IMAGENET_JEAN


def test_a_shape_mismatch_names_the_first_mismatched_tensor() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    source = {"_a.weight": torch.zeros(2, 3), "_b.weight": torch.zeros(5)}

    with pytest.raises(ModelLoadError, match=r"'_b.weight' has shape \(5,\).*'b.weight'"):
        _pair_in_order(target, source, Path("weights.pth"))


def test_a_checkpoint_with_fewer_tensors_is_refused() -> None:
    target = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}

    with pytest.raises(ModelLoadError, match="holds 1 tensors, the model expects 2"):
        _pair_in_order(target, {"a": torch.zeros(2)}, Path("weights.pth"))
