"""Small detectron2 model folders, built with random weights and saved with detectron2's own
checkpointer, for the detectron2 backend's tests and the segmentation contract.

detectron2 is not on PyPI, so every fixture here skips where it cannot be imported (as in
CI); build it from source to run them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handlers.detectron2_backend import CONFIG_FILE

DETECTRON2_MISSING = "detectron2 is not on PyPI; build it from source"
CLASSES = ["jeans", "skirt"]
MIN_SIZE_TEST = 64
MAX_SIZE_TEST = 112

# A narrow ResNet-50 + FPN and small heads: about 0.6 M parameters, a 2.5 MB checkpoint.
TINY_RCNN: dict[str, Any] = {
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 32,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 8,
    "MODEL.FPN.OUT_CHANNELS": 32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 100,
    "MODEL.ROI_HEADS.NUM_CLASSES": len(CLASSES),
    "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 32,
    "TEST.DETECTIONS_PER_IMAGE": 10,
    "INPUT.MIN_SIZE_TEST": MIN_SIZE_TEST,
    "INPUT.MAX_SIZE_TEST": MAX_SIZE_TEST,
}
TINY_RETINANET: dict[str, Any] = {
    **{key: value for key, value in TINY_RCNN.items() if ".ROI_" not in key and ".RPN." not in key},
    "MODEL.RETINANET.NUM_CLASSES": len(CLASSES),
    "MODEL.RETINANET.NUM_CONVS": 1,
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": 100,
}

MASK_RCNN_ZOO = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
FASTER_RCNN_ZOO = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
RETINANET_ZOO = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"


def zoo_config_file(name: str) -> Path:
    """A model-zoo YAML, found in detectron2's package without `detectron2.model_zoo`, which
    needs setuptools' removed pkg_resources (facebookresearch/detectron2#5494)."""
    import detectron2

    return Path(detectron2.__file__).parent / "model_zoo" / "configs" / name


def detectron2_model_cfg(zoo_name: str, options: dict[str, Any]) -> Any:
    """detectron2's CfgNode of a zoo config with `options` merged, on the CPU; skips the
    test without detectron2."""
    pytest.importorskip("detectron2", reason=DETECTRON2_MISSING)
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(zoo_config_file(zoo_name)))
    cfg.merge_from_list([item for pair in options.items() for item in pair])
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def save_detectron2_model(cfg: Any, folder: Path, *, seed: int = 0) -> Path:
    """Build `cfg`'s model with random weights and save it with DetectionCheckpointer as
    `model.pth` in `folder`."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model")
    return folder / "model.pth"


def write_folder_config(folder: Path, **fields: Any) -> Path:
    """`detectron2.json` with the fields given, over a random two-class model's defaults."""
    config = {
        "name": "random-detectron2",
        "weights": "model.pth",
        "classes": CLASSES,
        "score_threshold": 0.0,
        **fields,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def detectron2_mask_rcnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Mask R-CNN folder as detectron2's training leaves one: its `config.yaml` dumped
    from the config it trained with, and the checkpoint."""
    pytest.importorskip("detectron2", reason=DETECTRON2_MISSING)
    folder = tmp_path_factory.mktemp("d2-mask-rcnn")
    cfg = detectron2_model_cfg(MASK_RCNN_ZOO, TINY_RCNN)

    save_detectron2_model(cfg, folder)
    (folder / "config.yaml").write_text(cfg.dump())
    return write_folder_config(folder, name="random-mask-rcnn", config="config.yaml")


@pytest.fixture(scope="session")
def detectron2_faster_rcnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Faster R-CNN folder naming a model-zoo config and the options it was trained with."""
    pytest.importorskip("detectron2", reason=DETECTRON2_MISSING)
    folder = tmp_path_factory.mktemp("d2-faster-rcnn")

    save_detectron2_model(detectron2_model_cfg(FASTER_RCNN_ZOO, TINY_RCNN), folder)
    return write_folder_config(
        folder, name="random-faster-rcnn", config=FASTER_RCNN_ZOO, options=TINY_RCNN
    )


@pytest.fixture(scope="session")
def detectron2_retinanet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RetinaNet folder naming a model-zoo config and the options it was trained with."""
    pytest.importorskip("detectron2", reason=DETECTRON2_MISSING)
    folder = tmp_path_factory.mktemp("d2-retinanet")

    save_detectron2_model(detectron2_model_cfg(RETINANET_ZOO, TINY_RETINANET), folder)
    return write_folder_config(
        folder, name="random-retinanet", config=RETINANET_ZOO, options=TINY_RETINANET
    )
