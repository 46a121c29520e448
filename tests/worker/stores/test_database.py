from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from schemas.events import (
    EmbeddingInfo,
    EnrichmentCompleted,
    EventType,
    ImageResult,
    LabelResult,
    MaskResult,
    ModelVersions,
    ProductCreated,
    Status,
)
from tests.schemas.test_events import product_payload
from worker.local import LocalStack
from worker.stores import database

VERSIONS = ModelVersions(segmentation="seg@1", tagging="tag@1", embedding="emb@1")


def rows_for(
    product_id: str, vector: np.ndarray, versions: ModelVersions = VERSIONS
) -> database.EnrichmentRows:
    product = ProductCreated.model_validate(product_payload(product_id=product_id))
    image = ImageResult(
        url=product.images[0].url,
        image_sha256="ab" * 32,
        width=40,
        height=30,
        masks=[
            MaskResult(
                label="jeans", score=0.9, box=(1, 2, 30, 28), area=500, uri="s3://masks/m/0.png"
            )
        ],
        labels=[LabelResult(label="jeans", score=0.8), LabelResult(label="shoes", score=0.3)],
    )
    completed = EnrichmentCompleted(
        event_type=EventType.PRODUCT_ENRICHED,
        causation_id=product.event_id,
        product_id=product_id,
        status=Status.ENRICHED,
        images=[image],
        embedding=EmbeddingInfo(model_id="emb", dimension=len(vector)),
        model_versions=versions,
    )
    return database.EnrichmentRows(
        product=product, completed=completed, embedding=vector.astype(np.float32)
    )


@pytest.fixture
def conn(stack: LocalStack):  # type: ignore[no-untyped-def]
    with database.connect(stack.settings.database_url.get_secret_value()) as connection:
        yield connection


def test_migrations_run_twice_at_once_apply_each_migration_once(stack: LocalStack) -> None:
    url = stack.settings.database_url.get_secret_value()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: database.migrate(url), range(2)))

    assert results == [[], []]  # the stack migrated already; both runs find nothing to do
    with database.connect(url) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM schema_migrations")]
    assert names == [
        "0001_initial.sql",
        "0002_outbox.sql",
        "0003_attempts.sql",
        "0004_similarity.sql",
    ]


def test_writes_a_products_rows_in_one_transaction(conn) -> None:  # type: ignore[no-untyped-def]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4))

    enrichment_id = database.write_enrichment(conn, rows)

    assert enrichment_id is not None
    assert conn.execute(
        "SELECT count(*) FROM masks WHERE enrichment_id = %s", (enrichment_id,)
    ).fetchone() == (1,)
    assert conn.execute(
        "SELECT count(*) FROM labels WHERE enrichment_id = %s", (enrichment_id,)
    ).fetchone() == (2,)
    assert conn.execute(
        "SELECT dimension FROM embeddings WHERE enrichment_id = %s", (enrichment_id,)
    ).fetchone() == (4,)


def test_a_redelivered_event_writes_nothing_twice(conn) -> None:  # type: ignore[no-untyped-def]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4))

    first = database.write_enrichment(conn, rows)
    second = database.write_enrichment(conn, rows)

    assert first is not None and second is None
    count = conn.execute(
        "SELECT count(*) FROM enrichments WHERE event_id = %s", (rows.completed.causation_id,)
    ).fetchone()
    assert count == (1,)


def test_a_success_replaces_an_earlier_failure_of_the_same_event(conn) -> None:  # type: ignore[no-untyped-def]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4))
    failure = database.EnrichmentRows(
        product=rows.product,
        completed=rows.completed.model_copy(
            update={"status": Status.FAILED, "images": [], "reason": "unreadable"}
        ),
        embedding=None,
        error_kind="unreadable_image",
    )

    first = database.write_enrichment(conn, failure)
    again = database.write_enrichment(conn, failure)
    fixed = database.write_enrichment(conn, rows)

    assert first is not None and again is None and fixed == first
    status = conn.execute(
        "SELECT status, error_kind FROM enrichments WHERE enrichment_id = %s", (first,)
    ).fetchone()
    assert status == ("enriched", None)
