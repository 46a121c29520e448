"""A notebook's tagger, as a script: its get_y, loss and metric are defined in `__main__`.

`python tests/handlers/tagger_notebook.py OUT_DIR` trains a tiny learner one epoch on four
synthetic photos and exports it twice: OUT_DIR/cloudpickle with fastai's default export,
which holds `__main__`'s functions by value, and OUT_DIR/pickle with plain pickle, which
holds them by name (`__main__.get_y`), as older fastai did. Each folder gets a tagger.json.

Imported as `tests.handlers.tagger_notebook`, it only defines the functions: the module a
notebook's functions move to, for tagger.json's `function_modules`.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import torch
import torch.nn.functional as F
from fastai.data.block import DataBlock, MultiCategoryBlock
from fastai.data.transforms import IndexSplitter
from fastai.learner import Learner
from fastai.vision.augment import Resize
from fastai.vision.data import ImageBlock
from PIL import Image
from torch import nn

from handlers.tagging import CONFIG_FILE, EXPORT_FILE, ExportVersions, TaggerConfig

LABELS = ["dark", "light"]


# Returns Any: fasttransform casts to a get_y's return annotation and fails on list[str].
def get_y(path: Path) -> Any:
    """The label function: photos 0 and 1 are dark, 2 and 3 light."""
    return ["light"] if int(path.stem) >= 2 else ["dark"]


class NotebookLoss(nn.Module):
    """Binary cross-entropy on logits, as a notebook might write its own loss."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets.float())


def notebook_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A metric: the share of (photo, label) pairs predicted right at 0.5."""
    return ((logits.sigmoid() > 0.5) == targets.bool()).float().mean()


def export_notebook_taggers(out_dir: Path) -> None:
    photos = out_dir / "photos"
    photos.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (8, 8), (60 * index,) * 3).save(photos / f"{index}.png")
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock(vocab=LABELS)),
        get_y=get_y,
        splitter=IndexSplitter([0]),
        item_tfms=Resize(8),
    )
    loaders = block.dataloaders(sorted(photos.iterdir()), bs=2, num_workers=0)

    # Body then head, as fastai's vision_learner builds them.
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, len(LABELS)))
    learner = Learner(
        loaders,
        nn.Sequential(body, head),
        loss_func=NotebookLoss(),
        metrics=[notebook_accuracy],
    )
    with learner.no_logging():
        learner.fit(1)

    for name, pickle_module in (("cloudpickle", cloudpickle), ("pickle", pickle)):
        folder = out_dir / name
        folder.mkdir()
        learner.path = folder
        learner.export(EXPORT_FILE, pickle_module=pickle_module)
        TaggerConfig(
            name=f"notebook-{name}",
            labels=LABELS,
            thresholds={label: 0.5 for label in LABELS},
            image_size=8,
            versions=ExportVersions.installed(),
        ).write(folder / CONFIG_FILE)


if __name__ == "__main__":
    export_notebook_taggers(Path(sys.argv[1]))
