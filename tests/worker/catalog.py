"""Synthetic catalogs for similarity tests: a database of their own, written in bulk."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from worker.local import LocalStack
from worker.stores import database


@contextmanager
def catalog_database(stack: LocalStack) -> Iterator[str]:
    """A new, migrated database on the stack's Postgres; coverage counts see only its rows."""
    url = stack.settings.database_url.get_secret_value()
    name = f"catalog_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    catalog_url = make_conninfo(url, dbname=name)
    database.migrate(catalog_url)
    try:
        yield catalog_url
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def add_products(
    conn: psycopg.Connection[Any],
    model_version: str,
    embeddings: Mapping[str, np.ndarray],
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
    attributes: Mapping[str, Sequence[str]] | None = None,
    space: str = "text",
) -> None:
    """One enriched enrichment per product with one image, its labels and its embedding.

    `embeddings` maps product ids to (D,) vectors of `space`; a product already present gets
    another enrichment, so that a second model version (or space) can be added later.
    """
    labels = labels or {}
    attributes = attributes or {}
    with conn.transaction(), conn.cursor() as cur:
        for product_id, embedding in embeddings.items():
            cur.execute(
                "INSERT INTO products (product_id, title, attributes) VALUES (%s, %s, %s)"
                " ON CONFLICT (product_id) DO NOTHING",
                (product_id, f"title of {product_id}", list(attributes.get(product_id, []))),
            )
            cur.execute(
                "INSERT INTO enrichments (event_id, product_id, status, model_versions)"
                " VALUES (%s, %s, 'enriched', '{}') RETURNING enrichment_id",
                (uuid.uuid4(), product_id),
            )
            enrichment_id = _fetch_id(cur)
            cur.execute(
                "INSERT INTO images (enrichment_id, image_index, url, image_sha256, width, height)"
                " VALUES (%s, 0, 's3://catalog/x.jpg', '', 1, 1)",
                (enrichment_id,),
            )
            cur.executemany(
                "INSERT INTO labels (enrichment_id, image_index, label, score, model_version)"
                " VALUES (%s, 0, %s, 0.9, 'tag@1')",
                [(enrichment_id, label) for label in labels.get(product_id, [])],
            )
            cur.execute(
                "INSERT INTO embeddings (product_id, model_id, model_version, dimension,"
                " embedding, enrichment_id, space) VALUES (%s, 'emb', %s, %s, %s, %s, %s)",
                (product_id, model_version, len(embedding), embedding, enrichment_id, space),
            )


def _fetch_id(cur: psycopg.Cursor[Any]) -> int:
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def random_embeddings(count: int, dimension: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` random unit vectors (D,) float32, keyed p-0000, p-0001, ..."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {f"p-{index:04d}": vector for index, vector in enumerate(vectors)}


def exact_nearest(
    embeddings: Mapping[str, np.ndarray], query: np.ndarray, k: int, exclude: str | None = None
) -> list[str]:
    """The k ids nearest to `query` by cosine distance, computed here as the ground truth."""
    ids = [product_id for product_id in embeddings if product_id != exclude]
    if not ids:
        return []
    matrix = np.stack([embeddings[product_id] for product_id in ids])
    similarity = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    return [ids[index] for index in np.argsort(-similarity, kind="stable")[:k]]
