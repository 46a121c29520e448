from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker.errors import UnreadableImage
from worker.stores.images import decode_image

URL = "s3://catalog-images/p/front.jpg"


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_transparent_parts_of_an_rgba_png_become_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))

    decoded = decode_image(URL, encode(image, "PNG"), max_pixels=100)

    assert decoded.pixels[3, 3].tolist() == [255, 255, 255]
    assert decoded.pixels[0, 0].tolist() == [255, 0, 0]


def test_a_16_bit_grey_png_is_rescaled_not_clipped_to_white() -> None:
    values = np.full((2, 2), 32768, dtype=np.uint16)
    image = Image.fromarray(values)

    decoded = decode_image(URL, encode(image, "PNG"), max_pixels=100)

    assert decoded.pixels.shape == (2, 2, 3)
    assert 120 <= int(decoded.pixels[0, 0, 0]) <= 135


def test_exif_rotation_is_applied_so_pixels_match_the_photo_as_displayed() -> None:
    image = Image.new("RGB", (6, 3), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed

    decoded = decode_image(URL, encode(image, "JPEG", exif=exif), max_pixels=100)

    assert (decoded.width, decoded.height) == (3, 6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"no image at all", "not a readable image")],
)
def test_unreadable_bytes_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(UnreadableImage) as caught:
        decode_image(URL, data, max_pixels=100)

    assert reason in caught.value.reason


def test_a_truncated_jpeg_is_unreadable() -> None:
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")

    with pytest.raises(UnreadableImage):
        decode_image(URL, data[: len(data) // 2], max_pixels=10_000)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (200, 200)), "PNG")

    with pytest.raises(UnreadableImage) as caught:
        decode_image(URL, data, max_pixels=10_000)

    assert "over the limit" in caught.value.reason


def test_the_content_hash_names_the_bytes() -> None:
    data = encode(Image.new("RGB", (2, 2)), "PNG")

    first = decode_image(URL, data, max_pixels=100)
    second = decode_image("s3://other/key.png", data, max_pixels=100)

    assert first.sha256 == second.sha256 and len(first.sha256) == 64


def test_a_cmyk_jpeg_decodes_to_rgb() -> None:
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK

    decoded = decode_image(URL, encode(image, "JPEG"), max_pixels=100)

    red, green, blue = decoded.pixels[4, 4].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_a_palette_png_with_a_transparent_entry_decodes_over_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=1)

    decoded = decode_image(URL, data, max_pixels=100)

    assert decoded.pixels[1, 1].tolist() == [0, 0, 255]
    assert decoded.pixels[0, 0].tolist() == [255, 255, 255]


def test_a_one_pixel_image_decodes() -> None:
    decoded = decode_image(URL, encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), max_pixels=100)

    assert decoded.pixels.shape == (1, 1, 3)


def test_a_decompression_bomb_is_refused_by_its_header_alone() -> None:
    header_only = encode(Image.new("1", (20_000, 20_000)), "PNG")

    with pytest.raises(UnreadableImage) as caught:
        decode_image(URL, header_only, max_pixels=40_000_000)

    assert "over the limit" in caught.value.reason
