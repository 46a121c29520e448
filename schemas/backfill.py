"""A backfill request: which products to submit for enrichment again, from where, how fast.

`enrich backfill` builds one from its options; other services send the same object to the
Celery task `enrichment.start_backfill` (kwarg `request`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"

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
        default=None, gt=0, description="Products submitted per second at most; unset is as fast."
    )
    chunk_size: int = Field(
        default=2000, ge=1, le=50_000, description="Products per database round and confirm."
    )
