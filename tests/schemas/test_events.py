from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.events import ProductCreated
from schemas.export import SCHEMA_DIR, SCHEMA_FILES, render_schema


def product_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": "product.created",
        "schema_version": 1,
        "occurred_at": "2026-12-04T10:00:00Z",
        "product_id": "sku-502-slim",
        "title": "502 slim taper flex",
        "description": "Slim taper jeans in a medium wash.",
        "attributes": ["slim fit", "medium wash", "stretch denim"],
        "images": [{"url": "s3://catalog-images/sku-502/front.jpg", "role": "front"}],
    }
    payload.update(changes)
    return payload


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_json_schema_files_are_up_to_date(name: str) -> None:
    expected = render_schema(SCHEMA_FILES[name])

    written = (SCHEMA_DIR / name).read_text()

    assert written == expected, f"{name} is stale: run `enrich schemas`"


def test_accepts_a_valid_event_and_ignores_unknown_fields() -> None:
    payload = product_payload(shop_region="eu-west", internal={"a": 1})

    event = ProductCreated.model_validate(payload)

    assert event.product_id == "sku-502-slim"
    assert not hasattr(event, "shop_region")


def test_rejects_event_without_images() -> None:
    payload = product_payload(images=[])

    with pytest.raises(ValidationError) as caught:
        ProductCreated.model_validate(payload)

    assert caught.value.errors()[0]["loc"] == ("images",)


@pytest.mark.parametrize(
    "url", ["ftp://x/y.jpg", "http://shop.example/a.jpg", "s3://", "/etc/passwd"]
)
def test_rejects_image_urls_that_are_neither_s3_nor_https(url: str) -> None:
    payload = product_payload(images=[{"url": url}])

    with pytest.raises(ValidationError):
        ProductCreated.model_validate(payload)


@pytest.mark.parametrize("product_id", ["../../etc", "a/b", "", "x" * 200])
def test_rejects_product_ids_that_could_steer_a_key(product_id: str) -> None:
    payload = product_payload(product_id=product_id)

    with pytest.raises(ValidationError):
        ProductCreated.model_validate(payload)


def test_rejects_an_unknown_schema_version() -> None:
    payload = product_payload(schema_version=2)

    with pytest.raises(ValidationError) as caught:
        ProductCreated.model_validate(payload)

    assert caught.value.errors()[0]["loc"] == ("schema_version",)
