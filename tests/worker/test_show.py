"""`enrich show` draws a product's photo, read as the worker reads it, with its masks."""

from __future__ import annotations

import dataclasses
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.events import ProductImage
from schemas.settings import Settings
from tests.tls import HttpsServer, https_server
from tests.worker.stores.test_database import rows_for
from worker.errors import UnreadableImage
from worker.local import LocalStack
from worker.show import render_product
from worker.stores import database, objects

SIZE = (40, 30)
"""The photo's width and height, those of `rows_for`'s image."""


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsServer]:
    grey = np.full((SIZE[1], SIZE[0], 3), 128, dtype=np.uint8)
    with https_server(tmp_path_factory.mktemp("tls"), lambda _: png_of(grey)) as server:
        yield server


def stored_product(stack: LocalStack, url: str) -> str:
    """A product enriched from the photo at `url`, with one jeans mask over its left half."""
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    region = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    region[:, : SIZE[0] // 2] = 255
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, stack.settings.s3.mask_bucket)
    mask_uri = objects.put_mask(
        client, stack.settings.s3.mask_bucket, f"masks/{product_id}/0.png", png_of(region)
    )

    rows = rows_for(product_id, np.ones(4))
    image = rows.completed.images[0]
    mask = image.masks[0].model_copy(update={"uri": mask_uri})
    image = image.model_copy(update={"url": url, "masks": [mask]})
    rows = dataclasses.replace(
        rows,
        product=rows.product.model_copy(update={"images": [ProductImage(url=url)]}),
        completed=rows.completed.model_copy(update={"images": [image]}),
    )
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        database.write_enrichment(conn, rows)
    return product_id


def settings_for(stack: LocalStack, server: HttpsServer, hosts: list[str]) -> Settings:
    images = stack.settings.images.model_copy(
        update={
            "https_hosts": hosts,
            "allowed_networks": ["127.0.0.1/32"],
            "ca_bundle": server.ca_file,
        }
    )
    return stack.settings.model_copy(update={"images": images})


def test_show_draws_an_https_photo_from_an_allow_listed_host_with_its_mask(
    stack: LocalStack, photo_server: HttpsServer, tmp_path: Path
) -> None:
    path = f"/{uuid.uuid4().hex}.png"
    product_id = stored_product(stack, f"{photo_server.base}{path}")
    output = tmp_path / "show.png"

    render_product(settings_for(stack, photo_server, ["127.0.0.1"]), product_id, output)

    assert path in photo_server.requests
    drawn = np.asarray(Image.open(output).convert("RGB")).astype(int)
    tint = 0.5 * 128 + 0.5 * np.array([230, 25, 75])  # the first mask's colour over grey
    tinted = (np.abs(drawn - tint) <= 8).all(axis=2).sum()
    grey = (np.abs(drawn - 128) <= 8).all(axis=2).sum()
    assert tinted > 100, "the mask's half of the photo is tinted"
    assert grey > 100, "the other half is the photo's own grey"


def test_show_refuses_an_https_photo_from_a_host_that_is_not_allow_listed(
    stack: LocalStack, photo_server: HttpsServer, tmp_path: Path
) -> None:
    path = f"/{uuid.uuid4().hex}.png"
    product_id = stored_product(stack, f"{photo_server.base}{path}")

    with pytest.raises(UnreadableImage) as caught:
        render_product(
            settings_for(stack, photo_server, ["images.shop.example"]),
            product_id,
            tmp_path / "show.png",
        )

    assert "HTTPS_HOSTS" in caught.value.reason
    assert path not in photo_server.requests
