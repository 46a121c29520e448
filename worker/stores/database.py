"""Postgres with pgvector: migrations, one transaction per enrichment, similarity reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any
from uuid import UUID

import numpy as np
import numpy.typing as npt
import psycopg
import structlog
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

from schemas.events import EnrichmentCompleted, ProductCreated

log = structlog.get_logger(__name__)

_MIGRATION_LOCK = 72_007_001
"""pg_advisory_lock key held while migrating, so that two `enrich migrate` runs queue up."""


def connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, connect_timeout=10)
    register_vector(conn)
    return conn


def migrate(url: str) -> list[str]:
    """Apply the migrations not yet applied, in name order; returns the ones applied now."""
    migrations = sorted(
        (entry.name, entry.read_text())
        for entry in resources.files("worker.stores").joinpath("migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    applied_now: list[str] = []

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, text in migrations:
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(text.encode())
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied_now.append(name)
                log.info("migration_applied", migration=name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))

    return applied_now


def embedding_index_name(model_version: str, dimension: int) -> str:
    digest = hashlib.sha256(model_version.encode()).hexdigest()[:10]
    return f"embeddings_hnsw_{dimension}_{digest}"


def ensure_embedding_index(
    conn: psycopg.Connection[Any], model_version: str, dimension: int
) -> str:
    """An HNSW cosine index over one model's vectors, cast to that model's dimension.

    Queries must use the same expression (`embedding::vector(D)`) and the same predicate
    on model_version for the planner to use it.
    """
    name = embedding_index_name(model_version, dimension)
    statement = sql.SQL(
        "CREATE INDEX IF NOT EXISTS {name} ON embeddings USING hnsw "
        "((embedding::vector({dim})) vector_cosine_ops) WHERE model_version = {version}"
    ).format(
        name=sql.Identifier(name), dim=sql.Literal(dimension), version=sql.Literal(model_version)
    )
    with conn.transaction():
        # Two workers starting at once would race on the same CREATE INDEX.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(statement)
    return name


@dataclass(frozen=True)
class EnrichmentRows:
    """Everything one enrichment writes; `embedding` is (D,) float32 or None when failed."""

    product: ProductCreated
    completed: EnrichmentCompleted
    embedding: npt.NDArray[np.float32] | None
    error_stage: str | None = None
    error_kind: str | None = None


def write_enrichment(conn: psycopg.Connection[Any], rows: EnrichmentRows) -> int | None:
    """Write a product's rows in one transaction; returns the enrichment id.

    Returns None when this event was already written (a redelivery): nothing changes.
    """
    product, completed = rows.product, rows.completed

    with conn.transaction():
        _upsert_product(conn, product)
        enrichment_id = _insert_enrichment(conn, rows)
        if enrichment_id is None:
            return None

        for image_index, image in enumerate(completed.images):
            conn.execute(
                "INSERT INTO images (enrichment_id, image_index, url, image_sha256, width, height)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    enrichment_id,
                    image_index,
                    image.url,
                    image.image_sha256,
                    image.width,
                    image.height,
                ),
            )
            _insert_masks(conn, enrichment_id, image_index, completed)
            _insert_labels(conn, enrichment_id, image_index, completed)

        if rows.embedding is not None and completed.embedding is not None:
            _upsert_embedding(conn, enrichment_id, rows.embedding, completed)

    return enrichment_id


def _upsert_product(conn: psycopg.Connection[Any], product: ProductCreated) -> None:
    conn.execute(
        "INSERT INTO products (product_id, title, description, attributes, image_urls)"
        " VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (product_id) DO UPDATE SET title = excluded.title,"
        " description = excluded.description, attributes = excluded.attributes,"
        " image_urls = excluded.image_urls, updated_at = now()",
        (
            product.product_id,
            product.title,
            product.description,
            list(product.attributes),
            [image.url for image in product.images],
        ),
    )


def _insert_enrichment(conn: psycopg.Connection[Any], rows: EnrichmentRows) -> int | None:
    """A new enrichment row, or None when the event already has one.

    The one exception: a success replaces an earlier failure of the same event, so that a
    dead-lettered event replayed after a fix is enriched. A repeated failure changes nothing.
    """
    completed = rows.completed
    row = conn.execute(
        "INSERT INTO enrichments (event_id, product_id, status, model_versions, error_stage,"
        " error_kind, error_reason, timings_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (event_id) DO UPDATE SET status = excluded.status,"
        " model_versions = excluded.model_versions, error_stage = NULL, error_kind = NULL,"
        " error_reason = NULL, timings_ms = excluded.timings_ms, created_at = now()"
        " WHERE enrichments.status = 'failed' AND excluded.status = 'enriched'"
        " RETURNING enrichment_id",
        (
            completed.causation_id,
            completed.product_id,
            str(completed.status),
            Jsonb(completed.model_versions.model_dump()),
            rows.error_stage,
            rows.error_kind,
            completed.reason,
            Jsonb(completed.timings_ms),
        ),
    ).fetchone()
    return None if row is None else int(row[0])


def _insert_masks(
    conn: psycopg.Connection[Any], enrichment_id: int, image_index: int, done: EnrichmentCompleted
) -> None:
    image = done.images[image_index]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO masks (enrichment_id, image_index, mask_index, label, score, box, area,"
            " uri, model_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    enrichment_id,
                    image_index,
                    mask_index,
                    mask.label,
                    mask.score,
                    list(mask.box),
                    mask.area,
                    mask.uri,
                    done.model_versions.segmentation,
                )
                for mask_index, mask in enumerate(image.masks)
            ],
        )


def _insert_labels(
    conn: psycopg.Connection[Any], enrichment_id: int, image_index: int, done: EnrichmentCompleted
) -> None:
    image = done.images[image_index]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO labels (enrichment_id, image_index, label, score, model_version)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (enrichment_id, image_index, label.label, label.score, done.model_versions.tagging)
                for label in image.labels
            ],
        )


def _upsert_embedding(
    conn: psycopg.Connection[Any],
    enrichment_id: int,
    embedding: npt.NDArray[np.float32],
    done: EnrichmentCompleted,
) -> None:
    assert done.embedding is not None
    conn.execute(
        "INSERT INTO embeddings (product_id, model_id, model_version, dimension, embedding,"
        " enrichment_id) VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (product_id, model_version) DO UPDATE SET embedding = excluded.embedding,"
        " enrichment_id = excluded.enrichment_id, created_at = now()",
        (
            done.product_id,
            done.embedding.model_id,
            done.model_versions.embedding,
            done.embedding.dimension,
            embedding,
            enrichment_id,
        ),
    )


def count_attempt(conn: psycopg.Connection[Any], event_id: UUID) -> int:
    """Record that an event's task started once more; returns how often it has started."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO attempts (event_id, attempts) VALUES (%s, 1)"
            " ON CONFLICT (event_id) DO UPDATE SET attempts = attempts.attempts + 1,"
            " last_at = now() RETURNING attempts",
            (event_id,),
        ).fetchone()
    return int(row[0]) if row else 1


@dataclass(frozen=True)
class StoredMask:
    image_index: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    uri: str


@dataclass(frozen=True)
class StoredEnrichment:
    """A product's latest enrichment as `enrich show` draws it."""

    product_id: str
    title: str
    status: str
    image_urls: list[str]
    masks: list[StoredMask]
    labels: dict[int, list[tuple[str, float]]]


def latest_enrichment(conn: psycopg.Connection[Any], product_id: str) -> StoredEnrichment | None:
    head = conn.execute(
        "SELECT e.enrichment_id, p.title, e.status, p.image_urls FROM enrichments e"
        " JOIN products p USING (product_id) WHERE e.product_id = %s"
        " ORDER BY e.created_at DESC, e.enrichment_id DESC LIMIT 1",
        (product_id,),
    ).fetchone()
    if head is None:
        return None

    enrichment_id, title, status, image_urls = head
    masks = [
        StoredMask(row[0], row[1], float(row[2]), tuple(row[3]), row[4])
        for row in conn.execute(
            "SELECT image_index, label, score, box, uri FROM masks WHERE enrichment_id = %s"
            " ORDER BY image_index, mask_index",
            (enrichment_id,),
        )
    ]
    labels: dict[int, list[tuple[str, float]]] = {}
    for image_index, label, score in conn.execute(
        "SELECT image_index, label, score FROM labels WHERE enrichment_id = %s"
        " ORDER BY image_index, score DESC",
        (enrichment_id,),
    ):
        labels.setdefault(image_index, []).append((label, float(score)))
    return StoredEnrichment(product_id, title, status, list(image_urls), masks, labels)
