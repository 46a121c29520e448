"""The similarity service: `GET /products/{id}/similar` and `GET /search?q=` (`enrich serve`).

Both answer from worker/similarity.py; `?space=image` compares products by their photos.
The text embedder is loaded once, at startup, from the same model folder as the worker's,
so that a query text lands in the products' space.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request

from schemas.queries import SimilarityQuery, SimilarityResults, Space
from schemas.settings import Settings
from worker import similarity
from worker.stores import database

log = structlog.get_logger(__name__)

EncoderFactory = Callable[[], similarity.TextEncoder]


def create_app(*, database_url: str, load_encoder: EncoderFactory) -> FastAPI:
    """The service; `load_encoder` runs once at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.encoder = load_encoder()
        app.state.database_url = database_url
        yield

    app = FastAPI(
        title="catalog-enrichment similarity",
        summary="Products similar to a product or to a text, filtered by labels and attributes.",
        lifespan=lifespan,
    )
    app.get("/products/{product_id}/similar", response_model=SimilarityResults)(similar)
    app.get("/search", response_model=SimilarityResults)(search)
    return app


def from_settings(settings: Settings) -> FastAPI:
    return create_app(
        database_url=settings.database_url.get_secret_value(),
        load_encoder=lambda: similarity.load_text_encoder(settings),
    )


def connection(request: Request) -> Iterator[psycopg.Connection[Any]]:
    with database.connect(request.app.state.database_url) as conn:
        yield conn


def similarity_query(
    k: Annotated[int, Query(ge=1, le=1000, description="How many products.")] = 10,
    label: Annotated[
        list[str], Query(description="Only products tagged with all of these labels.")
    ] = [],  # noqa: B006 - FastAPI copies defaults per request
    attribute: Annotated[
        list[str], Query(description="Only products whose event carried all these attributes.")
    ] = [],  # noqa: B006
    model_version: Annotated[
        str | None, Query(description="The model version; unset means the space's current one.")
    ] = None,
    space: Annotated[
        Space, Query(description="Compare text embeddings or image embeddings (by product).")
    ] = Space.TEXT,
) -> SimilarityQuery:
    return SimilarityQuery(
        k=k, labels=label, attributes=attribute, model_version=model_version, space=space
    )


Conn = Annotated[psycopg.Connection[Any], Depends(connection)]
Filters = Annotated[SimilarityQuery, Depends(similarity_query)]


def similar(product_id: str, conn: Conn, query: Filters) -> SimilarityResults:
    """The products nearest to one product, itself excluded."""
    try:
        found = similarity.similar_to_product(conn, product_id, query)
    except similarity.SimilarityNotFound as error:
        raise HTTPException(status_code=404, detail=str(error)) from error
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error

    return _results(found, query.space)


def search(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=10_000, description="The query text.")],
    conn: Conn,
    query: Filters,
) -> SimilarityResults:
    """The products nearest to a text, embedded with the products' model."""
    try:
        found = similarity.similar_to_text(conn, request.app.state.encoder, q, query)
    except similarity.SimilarityNotFound as error:
        raise HTTPException(status_code=404, detail=str(error)) from error
    except ValueError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error

    return _results(found, query.space)


def _results(found: list[similarity.SimilarProduct], space: Space) -> SimilarityResults:
    version = found[0].model_version if found else None
    return SimilarityResults(model_version=version, space=space, results=found)
