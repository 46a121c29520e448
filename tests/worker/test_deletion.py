"""Product deletion: rows, masks and the tombstone, against the real Postgres and S3; then a
real worker receiving product-deleted events beside product-created ones."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from kombu import Connection

from schemas.events import EventType, ProductCreated, ProductDeleted
from tests.schemas.test_events import product_payload
from tests.worker.catalog import add_products, catalog_database
from worker.errors import InvalidEvent
from worker.events import catalog_exchange, dead_letter_queue, intake_queue, publish_json
from worker.intake import parse_intake_event
from worker.local import CompletionListener, LocalStack, worker_process
from worker.stores import database, deletion, objects

BUCKET = "catalog-images"
DELETED_AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def deleted_event(product_id: str, occurred_at: datetime = DELETED_AT) -> ProductDeleted:
    return ProductDeleted.model_validate(deleted_payload(product_id, occurred_at))


def deleted_payload(product_id: str, occurred_at: datetime = DELETED_AT) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "product.deleted",
        "schema_version": 1,
        "occurred_at": occurred_at.isoformat(),
        "product_id": product_id,
    }


def created_event(product_id: str, occurred_at: datetime) -> ProductCreated:
    return ProductCreated.model_validate(
        product_payload(product_id=product_id, occurred_at=occurred_at.isoformat())
    )


@pytest.fixture()
def catalog(stack: LocalStack) -> Iterator[psycopg.Connection[Any]]:
    """A fresh database with two enriched products, p-0000 and p-0001, and their events."""
    with catalog_database(stack) as url, database.connect(url) as conn:
        vectors = {f"p-000{i}": np.eye(4, dtype=np.float32)[i] for i in range(2)}
        add_products(conn, "emb@1", vectors, labels={"p-0000": ["jeans"]})
        for event_id, product_id in conn.execute("SELECT event_id, product_id FROM enrichments"):
            conn.execute("INSERT INTO attempts (event_id, attempts) VALUES (%s, 1)", (event_id,))
            conn.execute(
                "INSERT INTO outbox (event_id, exchange, routing_key, body)"
                " VALUES (%s, 'catalog', 'product.enriched', %s)",
                (
                    uuid.uuid4(),
                    json.dumps({"product_id": product_id, "causation_id": str(event_id)}),
                ),
            )
        conn.commit()
        conn.autocommit = True
        yield conn


def rows_of(conn: psycopg.Connection[Any], product_id: str) -> dict[str, int]:
    """The product's rows per table, and images, labels and masks without an enrichment."""
    counts = {
        table: count(conn, f"SELECT count(*) FROM {table} WHERE product_id = %s", product_id)
        for table in ("products", "enrichments", "embeddings")
    }
    for table in ("images", "labels", "masks"):
        counts[table] = count(
            conn,
            f"SELECT count(*) FROM {table}"
            " WHERE enrichment_id NOT IN (SELECT enrichment_id FROM enrichments)",
        )
    counts["outbox"] = count(
        conn, "SELECT count(*) FROM outbox WHERE body::jsonb ->> 'product_id' = %s", product_id
    )
    return counts


def count(conn: psycopg.Connection[Any], query: str, *params: str) -> int:
    row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return int(row[0])


def tombstone(conn: psycopg.Connection[Any], product_id: str) -> datetime | None:
    row = conn.execute(
        "SELECT deleted_at FROM deleted_products WHERE product_id = %s", (product_id,)
    ).fetchone()
    return None if row is None else row[0]


def test_deleting_removes_every_row_of_the_product_and_writes_a_tombstone(
    catalog: psycopg.Connection[Any],
) -> None:
    removed = deletion.delete_rows(catalog, deleted_event("p-0000"))

    assert set(rows_of(catalog, "p-0000").values()) == {0}
    assert catalog.execute("SELECT count(*) FROM attempts").fetchone() == (1,)
    assert removed == {"attempts": 1, "outbox": 1, "enrichments": 1, "embeddings": 1}
    assert tombstone(catalog, "p-0000") == DELETED_AT
    assert rows_of(catalog, "p-0001")["embeddings"] == 1


def test_a_redelivered_delete_is_harmless_and_the_latest_deletion_time_is_kept(
    catalog: psycopg.Connection[Any],
) -> None:
    event = deleted_event("p-0000")
    deletion.delete_rows(catalog, event)

    again = deletion.delete_rows(catalog, event)
    deletion.delete_rows(catalog, deleted_event("p-0000", DELETED_AT - timedelta(days=1)))

    assert again == {}
    assert tombstone(catalog, "p-0000") == DELETED_AT
    assert rows_of(catalog, "p-0001")["products"] == 1


def test_deleting_an_unknown_product_leaves_only_its_tombstone(
    catalog: psycopg.Connection[Any],
) -> None:
    removed = deletion.delete_rows(catalog, deleted_event("never-seen"))

    assert removed == {}
    assert tombstone(catalog, "never-seen") == DELETED_AT
    assert rows_of(catalog, "never-seen")["products"] == 0


def test_a_product_created_event_older_than_the_deletion_is_refused(
    catalog: psycopg.Connection[Any],
) -> None:
    deletion.delete_rows(catalog, deleted_event("p-0000"))
    stale = created_event("p-0000", DELETED_AT - timedelta(minutes=5))
    catalog.execute("INSERT INTO attempts (event_id, attempts) VALUES (%s, 1)", (stale.event_id,))

    with pytest.raises(deletion.ProductIsDeleted) as refused:
        deletion.admit_created(catalog, stale)

    assert "is deleted" in str(refused.value) and "skipped" in str(refused.value)
    assert refused.value.deleted_at == DELETED_AT
    assert tombstone(catalog, "p-0000") == DELETED_AT
    attempts = catalog.execute(
        "SELECT count(*) FROM attempts WHERE event_id = %s", (stale.event_id,)
    )
    assert attempts.fetchone() == (0,)


def test_a_newer_product_created_event_is_a_relisting_and_clears_the_tombstone(
    catalog: psycopg.Connection[Any],
) -> None:
    deletion.delete_rows(catalog, deleted_event("p-0000"))

    deletion.admit_created(catalog, created_event("p-0000", DELETED_AT + timedelta(minutes=5)))

    assert tombstone(catalog, "p-0000") is None
    add_products(catalog, "emb@1", {"p-0000": np.ones(4, dtype=np.float32)})
    assert rows_of(catalog, "p-0000")["products"] == 1


def test_a_backfill_event_submitted_after_the_deletion_does_not_bring_the_product_back(
    catalog: psycopg.Connection[Any],
) -> None:
    deletion.delete_rows(catalog, deleted_event("p-0000"))
    later = created_event("p-0000", DELETED_AT + timedelta(minutes=5))
    backfilled = later.model_copy(update={"backfill_run_id": "bf-nightly"})

    with pytest.raises(deletion.ProductIsDeleted) as refused:
        deletion.admit_created(catalog, backfilled)

    assert "bf-nightly" in str(refused.value)
    assert tombstone(catalog, "p-0000") == DELETED_AT


def test_the_database_refuses_to_write_a_product_that_has_a_tombstone(
    catalog: psycopg.Connection[Any],
) -> None:
    deletion.delete_rows(catalog, deleted_event("p-0000"))

    with (
        pytest.raises(deletion.ProductIsDeleted) as refused,
        deletion.refused_when_deleted("p-0000"),
    ):
        add_products(catalog, "emb@1", {"p-0000": np.ones(4, dtype=np.float32)})

    assert "deleted while it was enriched" in str(refused.value)
    assert rows_of(catalog, "p-0000")["products"] == 0
    add_products(catalog, "emb@1", {"p-0002": np.ones(4, dtype=np.float32)})


def test_the_products_masks_are_deleted_page_by_page_and_a_longer_id_keeps_its_own(
    stack: LocalStack,
) -> None:
    client = objects.make_client(stack.settings.s3)
    bucket = f"masks-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for product_id, count in (("p-1", 5), ("p-10", 2)):
        for index in range(count):
            key = objects.mask_key(product_id, "sha", "seg@1", index)
            objects.put_mask(client, bucket, key, b"png")

    deleted = deletion.delete_masks(client, bucket, "p-1", page_size=2)
    again = deletion.delete_masks(client, bucket, "p-1")

    left = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert (deleted, again) == (5, 0)
    assert sorted(left) == [objects.mask_key("p-10", "sha", "seg@1", i) for i in range(2)]


def test_the_intake_tells_a_deletion_from_a_creation_by_its_event_type() -> None:
    deleted = parse_intake_event(json.dumps({**deleted_payload("p-1"), "reason": "x"}))
    created = parse_intake_event(json.dumps(product_payload()))

    assert isinstance(deleted, ProductDeleted) and deleted.product_id == "p-1"
    assert isinstance(created, ProductCreated)


def test_an_invalid_deletion_names_the_field_and_the_value() -> None:
    body = json.dumps({**deleted_payload("p-1"), "product_id": "../etc"})

    with pytest.raises(InvalidEvent) as caught:
        parse_intake_event(body)

    assert caught.value.field == "product_id"
    assert "../etc" in caught.value.value
    assert "dead-lettered" in str(caught.value)


# --- a real worker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[CompletionListener, Path]]:
    log_file = tmp_path_factory.mktemp("deletion-worker") / "worker.log"
    with CompletionListener(stack.settings) as listener, worker_process(stack, log_file):
        yield listener, log_file
    print(log_file.read_text()[-3000:])


def publish(stack: LocalStack, payload: dict[str, Any] | str, routing_key: EventType) -> None:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    exchange = catalog_exchange(stack.settings)
    with (
        Connection(stack.settings.broker_url.get_secret_value()) as connection,
        connection.Producer() as producer,
    ):
        publish_json(
            producer,
            body.encode(),
            exchange=exchange,
            routing_key=str(routing_key),
            declare=[exchange, intake_queue(stack.settings)],
        )


def logged(log_file: Path, event: str, event_id: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines of one event name for one event id."""
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    return [
        line for line in lines if line.get("event") == event and line.get("event_id") == event_id
    ]


def wait_for_log(
    log_file: Path, event: str, event_id: str, *, times: int = 1, timeout_s: float = 180
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while len(found := logged(log_file, event, event_id)) < times:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{event} for {event_id} not logged {times} times in {timeout_s} s"
            )
        time.sleep(0.5)
    return found


def completion_of(listener: CompletionListener, event_id: str) -> dict[str, Any]:
    def mine(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for c in received if c["causation_id"] == event_id]

    listener.wait_until(lambda received: bool(mine(received)), timeout_s=240)
    found = mine(listener.received)
    assert len(found) == 1, found
    return found[0]


def masks_under(client: objects.S3Client, bucket: str, product_id: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"masks/{product_id}/")
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.mark.slow
def test_a_deleted_product_loses_its_rows_and_masks_and_only_a_newer_creation_brings_it_back(
    stack: LocalStack, running: tuple[CompletionListener, Path], datasets: Path
) -> None:
    listener, log_file = running
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, BUCKET)
    key = f"deletion/{uuid.uuid4().hex}.jpg"
    client.put_object(Bucket=BUCKET, Key=key, Body=(datasets / "ccp/photos/0016.jpg").read_bytes())
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    created = product_payload(
        product_id=product_id,
        images=[{"url": f"s3://{BUCKET}/{key}"}],
        occurred_at=(DELETED_AT - timedelta(hours=1)).isoformat(),
    )
    publish(stack, created, EventType.PRODUCT_CREATED)
    assert completion_of(listener, created["event_id"])["status"] == "enriched"
    mask_bucket = stack.settings.s3.mask_bucket
    assert masks_under(client, mask_bucket, product_id)
    delete = deleted_payload(product_id)

    publish(stack, delete, EventType.PRODUCT_DELETED)
    wait_for_log(log_file, "product_deleted", delete["event_id"])
    publish(stack, delete, EventType.PRODUCT_DELETED)  # a redelivery
    deletions = wait_for_log(log_file, "product_deleted", delete["event_id"], times=2)
    stale = {**created, "event_id": str(uuid.uuid4())}
    publish(stack, stale, EventType.PRODUCT_CREATED)
    wait_for_log(log_file, "enrichment_skipped", stale["event_id"])

    assert deletions[0]["masks"] > 0 and deletions[1]["masks"] == 0
    assert deletions[0]["rows"]["enrichments"] == 1
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        assert set(rows_of(conn, product_id).values()) == {0}
        assert tombstone(conn, product_id) == DELETED_AT
    assert masks_under(client, mask_bucket, product_id) == []

    relisted = {
        **created,
        "event_id": str(uuid.uuid4()),
        "occurred_at": (DELETED_AT + timedelta(hours=1)).isoformat(),
    }
    publish(stack, relisted, EventType.PRODUCT_CREATED)
    assert completion_of(listener, relisted["event_id"])["status"] == "enriched"
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        assert tombstone(conn, product_id) is None
        assert rows_of(conn, product_id)["embeddings"] >= 1


@pytest.mark.slow
def test_an_invalid_deletion_is_dead_lettered_with_its_reason(
    stack: LocalStack, running: tuple[CompletionListener, Path]
) -> None:
    body = json.dumps({**deleted_payload("p-1"), "occurred_at": "yesterday"})

    publish(stack, body, EventType.PRODUCT_DELETED)

    parked: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        queue = dead_letter_queue(stack.settings)(connection.channel())
        queue.declare()
        while not parked and time.monotonic() < deadline:
            message = queue.get(no_ack=True, accept=["application/json"])
            if message is None:
                time.sleep(0.5)
            elif message.body in (body, body.encode()):
                parked.append(dict(message.headers))
    assert parked, "the invalid deletion was not dead-lettered"
    assert parked[0]["x-error-kind"] == "invalid_event"
    assert "'occurred_at'" in parked[0]["x-error-reason"]
    assert parked[0]["x-original-routing-key"] == "product.deleted"
