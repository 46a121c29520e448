"""Similarity queries and their results, as the CLI, the HTTP service and clients see them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Tag = Annotated[str, Field(min_length=1, max_length=200)]


class Space(StrEnum):
    """Which embeddings a query compares: the product texts' or the product photos'."""

    TEXT = "text"
    IMAGE = "image"


class SimilarityQuery(BaseModel):
    """What to search for besides the product or text: how many, and which products qualify.

    `labels`: the product's latest enriched enrichment has all of them (on any image).
    `attributes`: the product event carried all of them. Without `model_version` the newest
    model version of `space` that covers the whole catalog is used (docs/similarity.md).
    `space`: text embeddings, or image embeddings (a product's is the normalised mean of its
    photos'); a text query searches the text space only.
    """

    model_config = ConfigDict(frozen=True)

    k: int = Field(default=10, ge=1, le=1000)
    labels: list[Tag] = Field(default_factory=list, max_length=50)
    attributes: list[Tag] = Field(default_factory=list, max_length=50)
    model_version: str | None = Field(default=None, max_length=300)
    space: Space = Space.TEXT
    exact_below: int = Field(
        default=1000, ge=0, description="A filter at most this many products pass: exact search."
    )
    ef_search: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="HNSW candidate list size; unset means max(40, 2k).",
    )


class SimilarProduct(BaseModel):
    """One result: cosine distance (0 identical, 2 opposite) in one model version's space."""

    model_config = ConfigDict(frozen=True)

    product_id: str
    title: str
    distance: float
    model_version: str


class SimilarityResults(BaseModel):
    """The answer of the HTTP service and of `enrich similar --json`."""

    model_version: str | None = Field(description="The space searched; null when none matched.")
    space: Space = Space.TEXT
    results: list[SimilarProduct]
