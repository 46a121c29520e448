"""Reading the Clothing Co-Parsing (CCP) dataset: photos, label names, pixel masks, tags.

The dataset's layout (see its README.md):

- `photos/NNNN.jpg`: street-fashion photos, RGB;
- `annotations/pixel-level/NNNN.mat`: images 1-900, `groundtruth`, one class index per pixel;
- `annotations/image-level/NNNN.mat`: images 1005-1990, `tags`, the class indices present;
- `label_list.mat`: `label_list`, the class names; index 0 is `null`, the background.

Image ids are the integers of the file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.io
from PIL import Image, ImageOps

from handlers.base import RGBImage

DEFAULT_CCP_ROOT = Path("../shared/datasets/ccp")
"""The dataset's place relative to the repository root."""

BACKGROUND = 0

VALIDATION_EVERY = 7
"""Every 7th pixel-annotated image (by id) is kept for validation, the rest train."""


@dataclass(frozen=True)
class Split:
    train: list[int]
    validation: list[int]


def load_label_names(root: Path) -> list[str]:
    """The class names; a class index from the annotations indexes this list."""
    raw = scipy.io.loadmat(root / "label_list.mat")["label_list"]
    return [str(entry[0]) if entry.size else "" for entry in raw.ravel()]


def load_photo(root: Path, image_id: int) -> RGBImage:
    """The photo as displayed: (H, W, 3) uint8 RGB."""
    with Image.open(photo_path(root, image_id)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def load_pixel_mask(root: Path, image_id: int) -> npt.NDArray[np.uint8]:
    """(H, W) uint8 class indices at the photo's size; 0 is the background."""
    path = root / "annotations" / "pixel-level" / f"{image_id:04d}.mat"
    mask: npt.NDArray[np.uint8] = scipy.io.loadmat(path)["groundtruth"].astype(np.uint8)
    return mask


def load_image_tags(root: Path, image_id: int) -> list[int]:
    """The class indices present in an image-level annotated photo, background excluded."""
    path = root / "annotations" / "image-level" / f"{image_id:04d}.mat"
    tags = scipy.io.loadmat(path)["tags"].ravel()
    return sorted({int(tag) for tag in tags} - {BACKGROUND})


def pixel_annotated_ids(root: Path) -> list[int]:
    return _annotated_ids(root / "annotations" / "pixel-level")


def image_annotated_ids(root: Path) -> list[int]:
    return _annotated_ids(root / "annotations" / "image-level")


def split_pixel_annotated(root: Path) -> Split:
    """A fixed train / validation split of the pixel-annotated images, by id."""
    ids = pixel_annotated_ids(root)
    return Split(
        train=[i for i in ids if i % VALIDATION_EVERY != 0],
        validation=[i for i in ids if i % VALIDATION_EVERY == 0],
    )


def photo_path(root: Path, image_id: int) -> Path:
    return root / "photos" / f"{image_id:04d}.jpg"


def _annotated_ids(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; is the CCP root right?")
    return sorted(int(path.stem) for path in folder.glob("*.mat"))
