"""Similarity queries: by product, by embedding, by text; with label and attribute filters;
in the text space or the image space.

The work is done by the SQL functions of migrations 0004 and 0006 (`similar_products`,
`similar_to_embedding`), which other services may call directly; these functions are their
Python client, used by `enrich similar` and by the HTTP service (worker/api.py).
"""

from __future__ import annotations

from typing import Any, LiteralString, Protocol

import numpy as np
import numpy.typing as npt
import psycopg
import psycopg.errors
import structlog

from schemas.queries import SimilarityQuery, SimilarProduct, Space
from schemas.settings import Settings

__all__ = ["SimilarProduct", "SimilarityNotFound", "SimilarityQuery", "Space", "TextEncoder"]

log = structlog.get_logger(__name__)


class SimilarityNotFound(LookupError):
    """The product has no embedding, or no embeddings of the model version exist."""


class TextEncoder(Protocol):
    """What text search needs of an embedder (handlers.embedding.TextEmbedder)."""

    model_version: str

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]: ...


def similar_to_product(
    conn: psycopg.Connection[Any], product_id: str, query: SimilarityQuery
) -> list[SimilarProduct]:
    """The k products nearest to one product, itself excluded."""
    rows = _run(
        conn,
        "SELECT * FROM similar_products(%s, %s, %s::text[], %s::text[], %s, %s, %s, space => %s)",
        (product_id, *_arguments(query), str(query.space)),
    )
    log.debug(
        "similar_to_product",
        product_id=product_id,
        space=str(query.space),
        k=query.k,
        num_results=len(rows),
    )
    return rows


def similar_to_embedding(
    conn: psycopg.Connection[Any],
    embedding: npt.NDArray[np.float32],
    query: SimilarityQuery,
) -> list[SimilarProduct]:
    """The k products nearest to an embedding (D,) float32 of the queried space and version."""
    rows = _run(
        conn,
        "SELECT * FROM similar_to_embedding("
        "%s, %s, %s::text[], %s::text[], %s, NULL, %s, %s, space => %s)",
        (embedding, *_arguments(query), str(query.space)),
    )
    log.debug("similar_to_embedding", space=str(query.space), k=query.k, num_results=len(rows))
    return rows


def similar_to_text(
    conn: psycopg.Connection[Any], encoder: TextEncoder, text: str, query: SimilarityQuery
) -> list[SimilarProduct]:
    """The k products nearest to a text, embedded with the encoder the products were.

    The encoder fixes the model version: a query naming another one, or the image space,
    is an error.
    """
    if query.space != Space.TEXT:
        raise ValueError(
            f"space {str(query.space)!r} cannot be searched by text: a text query lands in "
            "the text space; query the image space by product"
        )
    if query.model_version not in (None, encoder.model_version):
        raise ValueError(
            f"model_version {query.model_version!r} cannot be searched by text: the loaded "
            f"embedding model is {encoder.model_version!r}"
        )

    embedding = encoder.embed([text])[0]
    in_encoder_space = query.model_copy(update={"model_version": encoder.model_version})
    return similar_to_embedding(conn, embedding, in_encoder_space)


def load_text_encoder(settings: Settings) -> TextEncoder:
    """The worker's embedding model, so that query texts land in the products' space."""
    from handlers.embedding import TextEmbedder

    # The same folder, pooling and windows as the worker: another pooling is another space.
    return TextEmbedder.from_settings(settings.models)


def current_model_version(conn: psycopg.Connection[Any], space: Space = Space.TEXT) -> str | None:
    """The model version queries of `space` use by default (similarity_model_version in SQL)."""
    row = conn.execute(
        "SELECT model_version FROM similarity_model_version(%s)", (str(space),)
    ).fetchone()
    return None if row is None else str(row[0])


def _arguments(query: SimilarityQuery) -> tuple[Any, ...]:
    return (
        query.k,
        list(query.labels),
        list(query.attributes),
        query.model_version,
        query.exact_below,
        query.ef_search,
    )


def _run(
    conn: psycopg.Connection[Any], statement: LiteralString, params: tuple[Any, ...]
) -> list[SimilarProduct]:
    try:
        with conn.transaction():
            rows = conn.execute(statement, params).fetchall()
    except psycopg.errors.NoDataFound as error:
        raise SimilarityNotFound(_message(error)) from error
    except psycopg.errors.InvalidParameterValue as error:
        raise ValueError(_message(error)) from error

    return [
        SimilarProduct(product_id=row[0], title=row[1], distance=row[2], model_version=row[3])
        for row in rows
    ]


def _message(error: psycopg.Error) -> str:
    return error.diag.message_primary or str(error)
