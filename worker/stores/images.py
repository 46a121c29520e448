"""Decoding product photos into RGB arrays as a person sees them.

Fetching them is worker.stores.fetch's; this module needs no network or S3 client, so the
model stages' benchmarks run where only the model libraries are installed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.base import RGBImage
from worker.errors import UnreadableImage


@dataclass(frozen=True)
class DecodedImage:
    """pixels (H, W, 3) uint8 RGB, EXIF rotation applied; sha256 of the fetched bytes."""

    url: str
    sha256: str
    pixels: RGBImage

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(url: str, data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode to RGB as displayed: EXIF rotation applied, transparency over white, 16-bit
    grey rescaled to 8 bits. Anything Pillow cannot read is an UnreadableImage."""
    if not data:
        raise UnreadableImage(url, "the file is empty")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise UnreadableImage(
                    url, f"{image.width}x{image.height} pixels, over the limit of {max_pixels}"
                )
            image.load()
            pixels = _to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except UnidentifiedImageError as exc:
        raise UnreadableImage(url, "not a readable image: no image format recognised") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UnreadableImage(url, f"over the limit of {max_pixels} pixels: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(url, f"not a readable image: {exc}") from exc

    return DecodedImage(url=url, sha256=hashlib.sha256(data).hexdigest(), pixels=pixels)


def _to_rgb(image: Image.Image) -> RGBImage:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey spans 0..65535; dividing by 257 maps it onto 0..255 exactly.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.stack([grey] * 3, axis=-1)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
