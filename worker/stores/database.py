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

from schemas.events import (
    EnrichmentCompleted,
    ImageResult,
    LabelResult,
    MaskResult,
    ModelVersions,
    ProductCreated,
)

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
    """Everything one enrichment writes.

    `embedding` is the text embedding (D,) float32; `image_embeddings` one row per image
    (B, D') float32 and `product_image_embedding` their normalised mean (D',) float32; all
    None when the enrichment failed or reuses another's results (`reused_enrichment_id`).
    `input_sha256` is the hash of the product's inputs (worker.enrichment.input_sha256).
    """

    product: ProductCreated
    completed: EnrichmentCompleted
    embedding: npt.NDArray[np.float32] | None
    error_stage: str | None = None
    error_kind: str | None = None
    image_embeddings: npt.NDArray[np.float32] | None = None
    product_image_embedding: npt.NDArray[np.float32] | None = None
    input_sha256: str | None = None
    reused_enrichment_id: int | None = None


@dataclass(frozen=True)
class ReusableEnrichment:
    """The enrichment holding the results of a product's latest enriched enrichment, when
    that enrichment has the inputs and model versions asked for."""

    enrichment_id: int
    causation_id: UUID
    images: list[ImageResult]


@dataclass(frozen=True)
class WrittenEnrichment:
    """The enrichment row written and the rows it was written with."""

    enrichment_id: int
    rows: EnrichmentRows


def write_enrichment(
    conn: psycopg.Connection[Any], rows: EnrichmentRows
) -> WrittenEnrichment | None:
    """Write a product's rows in one transaction.

    Returns None when this event was already written (a redelivery): nothing changes. When
    another event of the same product with the same inputs and model versions was written
    while this one was computed, this event is written as a reuse of it, without result
    rows, and the rows returned (and their completion event) say so.
    """
    # The product's row lock, taken first, orders concurrent writers of one product.
    with conn.transaction():
        _upsert_product(conn, rows.product)
        if rows.reused_enrichment_id is None and rows.input_sha256 is not None:
            found = reusable_enrichment(
                conn, rows.product.product_id, rows.input_sha256, rows.completed.model_versions
            )
            if found is not None and found.causation_id != rows.completed.causation_id:
                rows = as_reuse(rows, found)

        enrichment_id = _insert_enrichment(conn, rows)
        if enrichment_id is None:
            return None
        if rows.reused_enrichment_id is None:
            _insert_results(conn, enrichment_id, rows)

    return WrittenEnrichment(enrichment_id, rows)


def as_reuse(rows: EnrichmentRows, found: ReusableEnrichment) -> EnrichmentRows:
    """`rows` as a reuse of `found`: its results under this event's image urls, no vectors."""
    images = [
        stored.model_copy(update={"url": image.url})
        for stored, image in zip(found.images, rows.product.images, strict=True)
    ]
    completed = rows.completed.model_copy(
        update={"images": images, "reused_from": found.causation_id}
    )
    return EnrichmentRows(
        product=rows.product,
        completed=completed,
        embedding=None,
        input_sha256=rows.input_sha256,
        reused_enrichment_id=found.enrichment_id,
    )


def reusable_enrichment(
    conn: psycopg.Connection[Any], product_id: str, input_sha256: str, versions: ModelVersions
) -> ReusableEnrichment | None:
    """The results an enrichment of these inputs and model versions would repeat, if the
    product's latest enriched enrichment has them; None otherwise."""
    latest = conn.execute(
        "SELECT coalesce(e.reused_enrichment_id, e.enrichment_id), e.input_sha256,"
        " e.model_versions FROM enrichments e WHERE e.product_id = %s AND e.status = 'enriched'"
        " ORDER BY e.created_at DESC, e.enrichment_id DESC LIMIT 1",
        (product_id,),
    ).fetchone()
    if latest is None:
        return None
    enrichment_id, latest_sha256, latest_versions = latest
    if latest_sha256 != input_sha256 or ModelVersions.model_validate(latest_versions) != versions:
        return None

    row = conn.execute(
        "SELECT event_id FROM enrichments WHERE enrichment_id = %s", (enrichment_id,)
    ).fetchone()
    assert row is not None, "reused_enrichment_id references an enrichment"
    return ReusableEnrichment(enrichment_id, row[0], _image_results(conn, enrichment_id))


def _image_results(conn: psycopg.Connection[Any], enrichment_id: int) -> list[ImageResult]:
    masks: dict[int, list[MaskResult]] = {}
    for image_index, label, score, box, area, uri in conn.execute(
        "SELECT image_index, label, score, box, area, uri FROM masks WHERE enrichment_id = %s"
        " ORDER BY image_index, mask_index",
        (enrichment_id,),
    ):
        mask = MaskResult(label=label, score=score, box=tuple(box), area=area, uri=uri)
        masks.setdefault(image_index, []).append(mask)
    labels: dict[int, list[LabelResult]] = {}
    for image_index, label, score in conn.execute(
        "SELECT image_index, label, score FROM labels WHERE enrichment_id = %s"
        " ORDER BY image_index, score DESC, label",
        (enrichment_id,),
    ):
        labels.setdefault(image_index, []).append(LabelResult(label=label, score=score))

    return [
        ImageResult(
            url=url,
            image_sha256=sha256,
            width=width,
            height=height,
            masks=masks.get(image_index, []),
            labels=labels.get(image_index, []),
        )
        for image_index, url, sha256, width, height in conn.execute(
            "SELECT image_index, url, image_sha256, width, height FROM images"
            " WHERE enrichment_id = %s ORDER BY image_index",
            (enrichment_id,),
        )
    ]


def _insert_results(
    conn: psycopg.Connection[Any], enrichment_id: int, rows: EnrichmentRows
) -> None:
    """Images, masks, labels and embeddings of an enrichment that ran its models."""
    completed = rows.completed
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
    if rows.image_embeddings is not None:
        _insert_image_embeddings(conn, enrichment_id, rows.image_embeddings, completed)
    if rows.product_image_embedding is not None and completed.image_embedding is not None:
        _upsert_product_image_embedding(
            conn, enrichment_id, rows.product_image_embedding, completed
        )


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
        " error_kind, error_reason, timings_ms, input_sha256, reused_enrichment_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (event_id) DO UPDATE SET status = excluded.status,"
        " model_versions = excluded.model_versions, error_stage = NULL, error_kind = NULL,"
        " error_reason = NULL, timings_ms = excluded.timings_ms, created_at = now(),"
        " input_sha256 = excluded.input_sha256,"
        " reused_enrichment_id = excluded.reused_enrichment_id"
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
            rows.input_sha256,
            rows.reused_enrichment_id,
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


def _insert_image_embeddings(
    conn: psycopg.Connection[Any],
    enrichment_id: int,
    embeddings: npt.NDArray[np.float32],
    done: EnrichmentCompleted,
) -> None:
    assert done.model_versions.image_embedding is not None
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO image_embeddings (enrichment_id, image_index, model_version, dimension,"
            " embedding) VALUES (%s, %s, %s, %s, %s)",
            [
                (
                    enrichment_id,
                    image_index,
                    done.model_versions.image_embedding,
                    len(embedding),
                    embedding,
                )
                for image_index, embedding in enumerate(embeddings)
            ],
        )


def _upsert_product_image_embedding(
    conn: psycopg.Connection[Any],
    enrichment_id: int,
    embedding: npt.NDArray[np.float32],
    done: EnrichmentCompleted,
) -> None:
    assert done.image_embedding is not None
    conn.execute(
        "INSERT INTO embeddings (product_id, model_id, model_version, dimension, embedding,"
        " enrichment_id, space) VALUES (%s, %s, %s, %s, %s, %s, 'image')"
        " ON CONFLICT (product_id, model_version) DO UPDATE SET embedding = excluded.embedding,"
        " enrichment_id = excluded.enrichment_id, created_at = now()",
        (
            done.product_id,
            done.image_embedding.model_id,
            done.model_versions.image_embedding,
            done.image_embedding.dimension,
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
        "SELECT coalesce(e.reused_enrichment_id, e.enrichment_id), p.title, e.status,"
        " p.image_urls FROM enrichments e"
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
