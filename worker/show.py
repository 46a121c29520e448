"""Drawing a product's first photo with its masks, boxes and labels, for a person to look at."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle
from PIL import Image

from schemas.settings import Settings
from worker.stores import database, objects
from worker.stores.fetch import ImageFetcher
from worker.stores.images import decode_image

_COLOURS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
    ],
    dtype=np.float32,
)


def render_product(settings: Settings, product_id: str, output: Path) -> None:
    """Write a PNG of the product's first image with its masks tinted and labels listed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with database.connect(settings.database_url.get_secret_value()) as conn:
        stored = database.latest_enrichment(conn, product_id)
    if stored is None:
        raise SystemExit(f"product {product_id!r} has no enrichment in the database")

    client = objects.make_client(settings.s3)
    url = stored.image_urls[0]
    # The photo is read as the worker read it: s3:// or an allow-listed https host.
    data = ImageFetcher(client, settings.s3, settings.images).fetch(url)
    pixels = decode_image(url, data, max_pixels=settings.images.max_pixels).pixels.astype(
        np.float32
    )

    masks = [mask for mask in stored.masks if mask.image_index == 0]
    for index, mask in enumerate(masks):
        png = objects.get_object(client, mask.uri, max_bytes=settings.images.max_bytes)
        region = np.asarray(Image.open(io.BytesIO(png))) > 127
        colour = _COLOURS[index % len(_COLOURS)]
        pixels[region] = 0.5 * pixels[region] + 0.5 * colour

    figure, axes = plt.subplots(figsize=(6, 6 * pixels.shape[0] / pixels.shape[1] + 0.8))
    axes.imshow(pixels.astype(np.uint8))
    for index, mask in enumerate(masks):
        x0, y0, x1, y1 = mask.box
        colour = _COLOURS[index % len(_COLOURS)] / 255
        axes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=2))
        axes.text(
            x0,
            y0,
            f"{mask.label} {mask.score:.2f}",
            color="white",
            fontsize=9,
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0},
        )
    labels = ", ".join(f"{label} {score:.2f}" for label, score in stored.labels.get(0, [])[:6])
    axes.set_title(f"{stored.product_id}: {stored.title}\n{labels or 'no labels'}", fontsize=9)
    axes.axis("off")

    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100, bbox_inches="tight")
    plt.close(figure)
