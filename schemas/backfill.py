"""A backfill request: which products to submit for enrichment again, from where, how fast.

`enrich backfill` builds one from its options; other services send the same object to the
Celery task `enrichment.start_backfill` (kwarg `request`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
MAX_PRODUCTS_PER_MESSAGE = 1000

SQL_COLUMNS = ("product_id", "title", "description", "attributes", "images", "image_urls")
"""Columns a `--from-sql` query may return; product_id, title and images or image_urls are
required, and other columns are ignored."""


class BackfillMode(StrEnum):
    """Which of the source's products are submitted, decided against the enrichments table."""

    MISSING = "missing"
    """Products with no enriched enrichment (never enriched, or only failed)."""
    STALE = "stale"
    """Products whose latest enriched enrichment has other model versions than the current."""
    ALL = "all"
    """Every product of the source."""


class JsonlSource(BaseModel):
    """A JSON lines file of product-created events, read on the machine that runs the backfill."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["jsonl"] = "jsonl"
    path: Path

    def describe(self) -> str:
        return f"jsonl:{self.path}"


class SqlSource(BaseModel):
    """Rows of a read-only query on the catalog's Postgres, one product per row."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["sql"] = "sql"
    query: str = Field(min_length=1, max_length=20_000)
    catalog_url: SecretStr | None = Field(
        default=None, description="The catalog's Postgres; unset means ENRICH_DATABASE_URL."
    )

    def describe(self) -> str:
        return f"sql:{' '.join(self.query.split())}"


class S3Source(BaseModel):
    """JSON lines objects of product-created events under an S3 prefix (`.gz` ones gzipped)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["s3"] = "s3"
    url: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

    def describe(self) -> str:
        return f"s3:{self.url}"


BackfillSource = Annotated[JsonlSource | SqlSource | S3Source, Field(discriminator="kind")]


class BackfillRequest(BaseModel):
    """What to submit. A request naming an existing run resumes it: products that run already
    submitted are skipped, and source and mode must be the run's own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: BackfillSource
    mode: BackfillMode = BackfillMode.MISSING
    run_id: str | None = Field(
        default=None, pattern=RUN_ID_PATTERN, description="Unset starts a new run."
    )
    rate: float | None = Field(
        default=None,
        gt=0,
        description="Products a second onto the workers' queue at most (paced when sent and when"
        " expanded); unset is as fast.",
    )
    chunk_size: int = Field(
        default=2000, ge=1, le=50_000, description="Products per database round and confirm."
    )
    products_per_message: int = Field(
        default=250,
        ge=1,
        le=MAX_PRODUCTS_PER_MESSAGE,
        description="Products per chunk message, which a worker expands into one task each.",
    )


class BackfillChunk(BaseModel):
    """The kwargs of `enrichment.expand_backfill_chunk`: product events of one run, each with
    its backfill event id, that a worker publishes as one `enrichment.enrich_product` task
    each; `rate` (products a second) paces that expansion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    rate: float | None = Field(default=None, gt=0)
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_PRODUCTS_PER_MESSAGE)

    @field_validator("events")
    @classmethod
    def _events_carry_their_ids(cls, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rest of each event is validated by its own enrich_product task."""
        for index, event in enumerate(events):
            if not isinstance(event.get("product_id"), str):
                raise ValueError(f"event {index} has no product_id string")
            try:
                UUID(str(event.get("event_id")))
            except ValueError:
                raise ValueError(f"event {index} has no event_id UUID") from None
        return events
