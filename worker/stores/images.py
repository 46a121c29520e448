"""Fetching and decoding product photos into RGB arrays as a person sees them."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.base import RGBImage
from schemas.settings import ImageSettings, S3Settings
from worker.errors import TransientFault, UnreadableImage
from worker.stores import objects


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


class ImageFetcher:
    """Reads s3:// URLs from allowed buckets and https:// URLs from allow-listed hosts."""

    def __init__(self, s3_client: objects.S3Client, s3: S3Settings, images: ImageSettings):
        self.s3_client = s3_client
        self.s3 = s3
        self.images = images
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=images.timeout_s), retries=False
        )

    def fetch(self, url: str) -> bytes:
        if url.startswith("s3://"):
            bucket, _ = objects.split_s3_url(url)
            if self.s3.image_buckets and bucket not in self.s3.image_buckets:
                raise UnreadableImage(url, f"bucket {bucket!r} is not in ENRICH_S3__IMAGE_BUCKETS")
            return objects.get_object(self.s3_client, url, max_bytes=self.images.max_bytes)
        return self._fetch_https(url)

    def _fetch_https(self, url: str) -> bytes:
        # TODO(#4): resolve the host and refuse loopback, private, link-local and metadata
        # addresses before connecting, and check redirects; today only the host allow-list
        # guards https URLs, and redirects are not followed.
        host = urlsplit(url).hostname or ""
        if host not in self.images.https_hosts:
            raise UnreadableImage(url, f"host {host!r} is not in ENRICH_IMAGES__HTTPS_HOSTS")

        try:
            response = self._http.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise TransientFault(f"fetching {url} failed: {exc}") from exc
        with response:
            if response.status >= 500:
                raise TransientFault(f"fetching {url} answered {response.status}")
            if response.status != 200:
                raise UnreadableImage(url, f"the server answered HTTP {response.status}")
            body = response.read(self.images.max_bytes + 1)
        if len(body) > self.images.max_bytes:
            raise UnreadableImage(url, f"larger than {self.images.max_bytes} bytes")
        return body


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
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
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
