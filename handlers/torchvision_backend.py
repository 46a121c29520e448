"""Segmentation backend: torchvision's Mask R-CNN on an EfficientNet-Lite0 + FPN backbone.

A model folder holds:

- `config.json`: `TorchvisionSegmenterConfig`, everything needed to rebuild the network;
- the weights file it names: a torch state_dict, floating tensors stored as float16;
- `MODEL_CARD.md`: data, command, training time and validation figures.

The network is kept small for CPU training and inference: 96 FPN channels, a 256-wide box
head and a two-layer, 96-channel mask head.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.layers.norm_act import freeze_batch_norm_2d
from timm.models.efficientnet import EfficientNet
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from handlers.backbones import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    efficientnet_lite0,
)
from handlers.base import ModelLoadError, RGBImage, Segmentation, Stage, StageError, model_version
from handlers.segmentation import make_segmentation, read_folder_config, resolve_device

log = structlog.get_logger(__name__)

CONFIG_FILE = "config.json"
ARCHITECTURE: Final = "maskrcnn_efficientnet_lite0_fpn"


class Architecture(BaseModel):
    """The network's shape; everything but the classes needed to rebuild it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["maskrcnn_efficientnet_lite0_fpn"] = ARCHITECTURE
    returned_stages: tuple[int, ...] = (2, 4, 6)
    trainable_stages: int = Field(default=2, ge=0, le=7)
    fpn_channels: int = 96
    fpn_groups: int = 32
    """GroupNorm groups in the pyramid: the trunk's features run at a standard deviation of
    about 7, which would start the heads' logits, and their losses, far too high."""
    representation_size: int = 256
    mask_head_channels: tuple[int, ...] = (96, 96)
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,))
    """Anchor sizes per pyramid level, fine to coarse, "pool" last; as many per level."""
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    image_mean: tuple[float, float, float] = EFFICIENTNET_LITE0_MEAN
    image_std: tuple[float, float, float] = EFFICIENTNET_LITE0_STD


class TorchvisionSegmenterConfig(BaseModel):
    """`config.json` of a torchvision model folder. `classes` exclude the background."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    backend: Literal["torchvision"] = "torchvision"
    architecture: Architecture = Architecture()
    classes: list[str] = Field(min_length=1)
    min_size: int = Field(gt=0)
    max_size: int = Field(gt=0)
    score_threshold: float = Field(ge=0.0, le=1.0)
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    detections_per_image: int = Field(default=20, gt=0)
    weights: str = "weights.pt"
    training: dict[str, Any] = Field(default_factory=dict)


class EfficientNetFPN(nn.Module):
    """EfficientNet-Lite0's stages, tapped at `returned_stages`, under a feature pyramid.

    Takes (B, 3, H, W) normalised images; gives feature maps named "0", "1", ... from fine
    to coarse and "pool", each with `out_channels` channels.
    """

    conv_stem: nn.Module
    bn1: nn.Module
    blocks: nn.Sequential

    def __init__(self, architecture: Architecture, *, pretrained: bool) -> None:
        super().__init__()
        trunk = cast(EfficientNet, efficientnet_lite0(pretrained=pretrained))
        last = max(architecture.returned_stages)
        channels = _stage_channels(trunk)

        self.conv_stem = trunk.conv_stem
        self.bn1 = trunk.bn1
        self.blocks = nn.Sequential(*list(trunk.blocks)[: last + 1])
        self.returned_stages = architecture.returned_stages
        self.fpn = FeaturePyramidNetwork(
            [channels[i] for i in architecture.returned_stages],
            architecture.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=partial(nn.GroupNorm, architecture.fpn_groups),
        )
        self.out_channels = architecture.fpn_channels

        # Batches of a few images cannot estimate batch statistics: keep ImageNet's, frozen.
        freeze_batch_norm_2d(self)  # type: ignore[no-untyped-call]
        _freeze_early_stages(self, architecture.trainable_stages)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.bn1(self.conv_stem(images))
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.returned_stages:
                features[str(len(features))] = x
        pyramid: OrderedDict[str, torch.Tensor] = self.fpn(features)
        return pyramid


def build_model(
    num_classes: int,
    *,
    architecture: Architecture | None = None,
    min_size: int | tuple[int, ...] = 320,
    max_size: int = 560,
    score_threshold: float = 0.05,
    detections_per_image: int = 20,
    pretrained_backbone: bool = False,
) -> MaskRCNN:
    """Mask R-CNN for `num_classes` garment classes (the background class is added here).

    Training passes a tuple `min_size` for scale jitter (torchvision then tests at the last
    one) and `pretrained_backbone=True`; loading passes the folder's config and weights.
    """
    architecture = architecture or Architecture()
    backbone = EfficientNetFPN(architecture, pretrained=pretrained_backbone)
    levels = [str(i) for i in range(len(architecture.returned_stages))]
    channels = architecture.fpn_channels
    mask_channels = architecture.mask_head_channels

    anchors = AnchorGenerator(
        sizes=architecture.anchor_sizes,
        aspect_ratios=(architecture.aspect_ratios,) * len(architecture.anchor_sizes),
    )
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(architecture.image_mean),
        image_std=list(architecture.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=250,
        rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, architecture.representation_size),
        box_predictor=FastRCNNPredictor(architecture.representation_size, num_classes + 1),
        box_score_thresh=score_threshold,
        box_detections_per_img=detections_per_image,
        box_batch_size_per_image=64,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, list(mask_channels), dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_classes + 1),
    )
    return model


def save_weights(model: nn.Module, path: Path) -> None:
    """Write `model`'s state_dict with floating tensors as float16, to keep the folder small."""
    state = {
        name: tensor.detach().to("cpu", torch.float16) if tensor.is_floating_point() else tensor
        for name, tensor in model.state_dict().items()
    }
    torch.save(state, path)


def read_config(model_dir: Path) -> TorchvisionSegmenterConfig:
    return read_folder_config(model_dir, CONFIG_FILE, TorchvisionSegmenterConfig, "torchvision")


class TorchvisionSegmenter:
    """A loaded torchvision Mask R-CNN in eval mode; see `handlers.segmentation.Segmenter`."""

    def __init__(
        self,
        model: MaskRCNN,
        config: TorchvisionSegmenterConfig,
        *,
        model_version: str,
        device: torch.device,
    ) -> None:
        self.model_version = model_version
        self.classes = list(config.classes)
        self.score_threshold = config.score_threshold
        self._model = model
        self._mask_threshold = config.mask_threshold
        self._device = device

    def segment(self, images: Sequence[RGBImage]) -> list[Segmentation]:
        """One `Segmentation` per (H, W, 3) uint8 RGB image, from one forward pass."""
        if not images:
            return []
        tensors = [self._to_tensor(image) for image in images]

        with torch.inference_mode():
            outputs: list[dict[str, torch.Tensor]] = self._model(tensors)

        return [
            self._to_segmentation(output, (image.shape[0], image.shape[1]))
            for output, image in zip(outputs, images, strict=True)
        ]

    def _to_tensor(self, image: RGBImage) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1] on the model's device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise StageError(
                Stage.SEGMENTATION,
                f"image must be (H, W, 3) uint8 RGB, received {image.shape} {image.dtype}",
            )
        # A copy: decoded images are often read-only, which torch.from_numpy warns about.
        tensor = torch.from_numpy(np.array(image, order="C")).to(self._device)
        return tensor.permute(2, 0, 1).float().div_(255.0)

    def _to_segmentation(
        self, output: dict[str, torch.Tensor], image_size: tuple[int, int]
    ) -> Segmentation:
        masks = (output["masks"][:, 0] > self._mask_threshold).cpu().numpy()
        labels = output["labels"].cpu().numpy()
        return make_segmentation(
            pred_masks=masks,
            # float() since autocast may leave them float16 or bfloat16 (no numpy type).
            mask_scores=output["scores"].float().cpu().numpy(),
            pred_boxes=output["boxes"].float().cpu().numpy(),
            pred_classes=[self.classes[label - 1] for label in labels],
            image_size=image_size,
        )


def load(
    model_dir: Path, *, device: str | None = None, score_threshold: float | None = None
) -> TorchvisionSegmenter:
    """Rebuild the network from `model_dir`'s config, load its weights, switch to eval."""
    started = time.perf_counter()
    config = read_config(model_dir)
    if score_threshold is not None:
        config = config.model_copy(update={"score_threshold": score_threshold})
    target = resolve_device(device)

    model = build_model(
        len(config.classes),
        architecture=config.architecture,
        min_size=config.min_size,
        max_size=config.max_size,
        score_threshold=config.score_threshold,
        detections_per_image=config.detections_per_image,
    )
    load_weights(model, model_dir / config.weights)
    model.to(target).eval()

    version = model_version(config.name, model_dir)
    log.info(
        "model_loaded",
        stage=Stage.SEGMENTATION,
        backend="torchvision",
        model_version=version,
        device=str(target),
        seconds=round(time.perf_counter() - started, 3),
    )
    return TorchvisionSegmenter(model, config, model_version=version, device=target)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the state_dict at `path` into `model`, strictly; ModelLoadError when it differs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ModelLoadError(f"weights file {path} is missing") from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(f"{path} does not fit the configured network: {error}") from error


def _stage_channels(trunk: EfficientNet) -> list[int]:
    """Output channels of each of the trunk's stages, in order."""
    return [
        [module for module in stage.modules() if isinstance(module, nn.Conv2d)][-1].out_channels
        for stage in trunk.blocks
    ]


def _freeze_early_stages(backbone: EfficientNetFPN, trainable_stages: int) -> None:
    """Freeze the stem and all but the last `trainable_stages` stages of the trunk."""
    frozen: list[nn.Module] = [backbone.conv_stem, backbone.bn1]
    frozen += list(backbone.blocks)[: max(0, len(backbone.blocks) - trainable_stages)]
    for module in frozen:
        module.requires_grad_(False)
