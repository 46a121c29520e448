"""Event contracts that other services code against.

The JSON Schema files beside this module are generated from these models
(`enrich schemas`); a test fails when they are out of date.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal
from uuid import UUID, uuid4

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

PRODUCT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""Product ids become part of S3 keys, so they are kept to a safe alphabet."""

_IMAGE_URL = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+|https://[^\s/]+/\S*)$")


class EventType(StrEnum):
    PRODUCT_CREATED = "product.created"
    PRODUCT_ENRICHED = "product.enriched"
    PRODUCT_ENRICHMENT_FAILED = "product.enrichment_failed"
    PRODUCT_DELETED = "product.deleted"


class ImageRole(StrEnum):
    FRONT = "front"
    BACK = "back"
    SIDE = "side"
    DETAIL = "detail"


class Status(StrEnum):
    ENRICHED = "enriched"
    FAILED = "failed"


def _check_image_url(url: str) -> str:
    if not _IMAGE_URL.match(url):
        raise ValueError("must be s3://bucket/key or https://host/path")
    return url


ImageUrl = Annotated[str, AfterValidator(_check_image_url)]


class ProductImage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    url: ImageUrl = Field(max_length=2048, examples=["s3://catalog-images/p-1001/front.jpg"])
    role: ImageRole | None = None


class ProductCreated(BaseModel):
    """A shop uploaded a product. Published by the catalog with routing key `product.created`.

    Unknown fields are ignored, so that producers can add fields before consumers know them.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: UUID
    event_type: Literal[EventType.PRODUCT_CREATED]
    schema_version: Literal[1]
    occurred_at: datetime
    product_id: str = Field(pattern=PRODUCT_ID_PATTERN)
    title: str = Field(max_length=1000)
    description: str = Field(default="", max_length=100_000)
    attributes: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=200
    )
    images: list[ProductImage] = Field(min_length=1, max_length=20)
    backfill_run_id: str | None = Field(
        default=None,
        max_length=200,
        description="Set by `enrich backfill` on the events it submits. Such an event re-enriches "
        "a product and never re-lists one that was deleted, whatever its occurred_at.",
    )


class ProductDeleted(BaseModel):
    """The catalog removed a product. Published by the catalog with routing key
    `product.deleted`; the worker deletes the product's rows and masks and keeps a tombstone,
    so that a product-created event older than `occurred_at` does not bring it back.

    Unknown fields are ignored, as in ProductCreated.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: UUID
    event_type: Literal[EventType.PRODUCT_DELETED]
    schema_version: Literal[1]
    occurred_at: datetime
    product_id: str = Field(pattern=PRODUCT_ID_PATTERN)


class MaskResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str = Field(description="Garment class of the instance.")
    score: float
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in pixels.")
    area: int = Field(description="Mask pixels.")
    uri: str = Field(description="s3://bucket/key of the mask PNG (one channel, 0/255).")


class LabelResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    score: float


class ImageResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str
    image_sha256: str
    width: int
    height: int
    masks: list[MaskResult]
    labels: list[LabelResult]


class EmbeddingInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_id: str
    dimension: int


class ModelVersions(BaseModel):
    """Each stage's model version, `name@hash` of its files; an enrichment is recomputed only
    when these or its inputs change."""

    model_config = ConfigDict(frozen=True)

    segmentation: str
    tagging: str
    embedding: str
    image_embedding: str | None = Field(
        default=None,
        description="The tagger's version with the pooling, `name@hash+avgpool`; absent in "
        "enrichments made before image embeddings.",
    )


class EnrichmentCompleted(BaseModel):
    """The worker finished a product: routing key `product.enriched` or
    `product.enrichment_failed`. `causation_id` is the product-created event's id."""

    model_config = ConfigDict(frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    event_type: Literal[EventType.PRODUCT_ENRICHED, EventType.PRODUCT_ENRICHMENT_FAILED]
    schema_version: Literal[1] = 1
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    causation_id: UUID
    product_id: str
    status: Status
    reason: str | None = Field(default=None, description="Why the enrichment failed.")
    images: list[ImageResult] = Field(default_factory=list)
    embedding: EmbeddingInfo | None = None
    image_embedding: EmbeddingInfo | None = Field(
        default=None, description="The image space: one vector per image and per product."
    )
    model_versions: ModelVersions
    reused_from: UUID | None = Field(
        default=None,
        description="Set when no model ran: the product's text, images (by sha256) and model "
        "versions equal those of its latest enrichment, caused by this product-created event "
        "id; `images` repeats that enrichment's results and no new rows or masks were written.",
    )
    timings_ms: dict[str, float] = Field(
        default_factory=dict, description="Milliseconds per stage and in total."
    )

    @property
    def routing_key(self) -> str:
        return str(self.event_type)
