from __future__ import annotations

import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

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

VERSIONS = ModelVersions(
    segmentation="seg@1", tagging="tag@1", embedding="emb@1", image_embedding="tag@1+avgpool"
)
INPUTS = "cd" * 32
"""An input hash; rows with the same product, inputs and versions are one enrichment."""


def rows_for(
    product_id: str,
    vector: np.ndarray,
    versions: ModelVersions = VERSIONS,
    *,
    image_vectors: np.ndarray | None = None,
    input_sha256: str | None = None,
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
        image_embedding=None
        if image_vectors is None
        else EmbeddingInfo(model_id="tag+avgpool", dimension=image_vectors.shape[1]),
        model_versions=versions,
    )
    return database.EnrichmentRows(
        product=product,
        completed=completed,
        embedding=vector.astype(np.float32),
        image_embeddings=image_vectors,
        product_image_embedding=None if image_vectors is None else image_vectors.mean(axis=0),
        input_sha256=input_sha256,
    )


def event_of(rows: database.EnrichmentRows, **changes: object) -> database.EnrichmentRows:
    """The same product under a new event id, with `changes` to its completion event."""
    event_id = uuid.uuid4()
    product = rows.product.model_copy(update={"event_id": event_id})
    completed = rows.completed.model_copy(update={"causation_id": event_id, **changes})
    return dataclasses.replace(rows, product=product, completed=completed)


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
    shipped = sorted(
        entry.name
        for entry in resources.files("worker.stores").joinpath("migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    assert names == shipped
    assert names[:6] == [
        "0001_initial.sql",
        "0002_outbox.sql",
        "0003_attempts.sql",
        "0004_similarity.sql",
        "0005_backfill.sql",
        "0006_image_embeddings.sql",
    ]


def test_writes_a_products_rows_in_one_transaction(conn) -> None:  # type: ignore[no-untyped-def]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4))

    written = database.write_enrichment(conn, rows)

    assert written is not None
    enrichment_id = written.enrichment_id
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

    assert first is not None and again is None and fixed is not None
    assert fixed.enrichment_id == first.enrichment_id
    status = conn.execute(
        "SELECT status, error_kind FROM enrichments WHERE enrichment_id = %s",
        (first.enrichment_id,),
    ).fetchone()
    assert status == ("enriched", None)


def test_image_embeddings_are_written_per_image_and_per_product_in_the_image_space(conn) -> None:  # type: ignore[no-untyped-def]
    image_vectors = np.eye(3, dtype=np.float32)[:1]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), image_vectors=image_vectors)

    written = database.write_enrichment(conn, rows)

    assert written is not None
    per_image = conn.execute(
        "SELECT image_index, model_version, dimension FROM image_embeddings"
        " WHERE enrichment_id = %s",
        (written.enrichment_id,),
    ).fetchall()
    assert per_image == [(0, "tag@1+avgpool", 3)]
    spaces = conn.execute(
        "SELECT space, model_version, dimension FROM embeddings WHERE enrichment_id = %s"
        " ORDER BY space",
        (written.enrichment_id,),
    ).fetchall()
    assert spaces == [("image", "tag@1+avgpool", 3), ("text", "emb@1", 4)]


def test_an_event_with_the_inputs_and_versions_of_the_latest_enrichment_reuses_it(conn) -> None:  # type: ignore[no-untyped-def]
    first = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), input_sha256=INPUTS)
    second = event_of(first)

    original = database.write_enrichment(conn, first)
    reuse = database.write_enrichment(conn, second)

    assert original is not None and reuse is not None
    assert reuse.rows.reused_enrichment_id == original.enrichment_id
    assert reuse.rows.completed.reused_from == first.completed.causation_id
    assert reuse.rows.completed.causation_id == second.completed.causation_id
    assert reuse.rows.completed.images == first.completed.images
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM images WHERE enrichment_id = %(id)s),"
        " (SELECT count(*) FROM masks WHERE enrichment_id = %(id)s),"
        " (SELECT count(*) FROM embeddings WHERE enrichment_id = %(id)s)",
        {"id": reuse.enrichment_id},
    ).fetchone()
    assert counts == (0, 0, 0)
    shown = database.latest_enrichment(conn, first.product.product_id)
    assert shown is not None and [m.uri for m in shown.masks] == ["s3://masks/m/0.png"]


def test_a_reuse_of_a_reuse_points_at_the_enrichment_that_holds_the_results(conn) -> None:  # type: ignore[no-untyped-def]
    first = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), input_sha256=INPUTS)

    original = database.write_enrichment(conn, first)
    database.write_enrichment(conn, event_of(first))
    third = database.write_enrichment(conn, event_of(first))

    assert original is not None and third is not None
    assert third.rows.reused_enrichment_id == original.enrichment_id
    assert third.rows.completed.reused_from == first.completed.causation_id


@pytest.mark.parametrize(
    "change",
    [
        {"input_sha256": "ef" * 32},
        {"versions": VERSIONS.model_copy(update={"tagging": "tag@2"})},
    ],
    ids=["changed inputs", "changed model version"],
)
def test_changed_inputs_or_a_changed_model_version_write_new_results(  # type: ignore[no-untyped-def]
    conn, change: dict[str, object]
) -> None:
    first = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), input_sha256=INPUTS)
    versions = change.get("versions", VERSIONS)
    assert isinstance(versions, ModelVersions)
    second = dataclasses.replace(
        event_of(first, model_versions=versions),
        input_sha256=str(change.get("input_sha256", INPUTS)),
    )

    database.write_enrichment(conn, first)
    found = database.reusable_enrichment(
        conn, first.product.product_id, str(second.input_sha256), versions
    )
    written = database.write_enrichment(conn, second)

    assert found is None
    assert written is not None and written.rows.reused_enrichment_id is None
    assert written.rows.completed.reused_from is None
    assert conn.execute(
        "SELECT count(*) FROM masks WHERE enrichment_id = %s", (written.enrichment_id,)
    ).fetchone() == (1,)


def test_a_failed_enrichment_is_never_reused(conn) -> None:  # type: ignore[no-untyped-def]
    rows = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), input_sha256=INPUTS)
    failure = dataclasses.replace(
        rows,
        completed=rows.completed.model_copy(
            update={"status": Status.FAILED, "images": [], "reason": "stage failed"}
        ),
        embedding=None,
        error_kind="stage_failed",
    )

    database.write_enrichment(conn, failure)
    found = database.reusable_enrichment(conn, rows.product.product_id, INPUTS, VERSIONS)

    assert found is None


def test_a_products_labels_are_those_of_its_latest_enriched_enrichment(conn) -> None:  # type: ignore[no-untyped-def]
    first = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4), input_sha256=INPUTS)
    retagged_image = first.completed.images[0].model_copy(
        update={"labels": [LabelResult(label="skirt", score=0.7)]}
    )
    retagged = dataclasses.replace(event_of(first, images=[retagged_image]), input_sha256="ef" * 32)
    failure = dataclasses.replace(
        event_of(first, status=Status.FAILED, images=[], reason="unreadable"),
        embedding=None,
        error_kind="unreadable_image",
    )
    product_id = first.product.product_id
    conn.autocommit = True  # each write commits: the labels are set when it does

    def labels() -> list[str]:
        row = conn.execute(
            "SELECT labels FROM products WHERE product_id = %s", (product_id,)
        ).fetchone()
        assert row is not None
        return list(row[0])

    database.write_enrichment(conn, first)
    after_first = labels()
    database.write_enrichment(conn, retagged)
    after_retagging = labels()
    database.write_enrichment(conn, failure)
    after_failure = labels()
    database.write_enrichment(conn, event_of(retagged))
    after_reuse = labels()

    assert after_first == ["jeans", "shoes"]
    assert after_retagging == ["skirt"]
    assert after_failure == ["skirt"]  # a failure leaves the last enriched results in place
    assert after_reuse == ["skirt"]


def test_removing_the_latest_enrichment_gives_back_the_labels_of_the_one_before(conn) -> None:  # type: ignore[no-untyped-def]
    first = rows_for(f"p-{uuid.uuid4().hex[:6]}", np.ones(4))
    retagged_image = first.completed.images[0].model_copy(
        update={"labels": [LabelResult(label="skirt", score=0.7)]}
    )
    conn.autocommit = True
    database.write_enrichment(conn, first)
    latest = database.write_enrichment(conn, event_of(first, images=[retagged_image]))
    assert latest is not None

    conn.execute("DELETE FROM enrichments WHERE enrichment_id = %s", (latest.enrichment_id,))

    row = conn.execute(
        "SELECT labels FROM products WHERE product_id = %s", (first.product.product_id,)
    ).fetchone()
    assert row == (["jeans", "shoes"],)
