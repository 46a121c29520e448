"""Deleting a product: its rows, its mask objects, and a tombstone that keeps it deleted.

A product-deleted event removes every row of the product (the products row, whose foreign
keys cascade to enrichments, images, masks, labels and embeddings; every other table with a
`product_id` column; the attempts and outbox rows of its events) and the mask objects
under `masks/{product_id}/`, and writes a tombstone, `deleted_products(product_id,
deleted_at)` with the event's occurred_at.

Ordering, by the events' occurred_at: a product-created event at or before the deletion is
skipped without running a model or writing a row; a newer one is a re-listed product, which
clears the tombstone and is enriched as usual. Migration 0007 also refuses, in the database,
any write of a product that has a tombstone, which covers an enrichment that was already
running when the deletion committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import sql

from schemas.events import ProductCreated, ProductDeleted
from worker.errors import TransientFault
from worker.stores import database, objects

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef
else:
    ObjectIdentifierTypeDef = dict

log = structlog.get_logger(__name__)

DELETED_SQLSTATE = "ENDEL"
"""What migration 0007's guard raises when a deleted product is written."""

_KEPT = ("products", "deleted_products")
"""Tables with a product_id column that are not emptied by the table scan: the products row
goes last (its cascade takes the rest) and the tombstone stays."""


class ProductIsDeleted(Exception):
    """A product-created event for a product deleted at or after the event occurred."""

    kind = "product_deleted"

    def __init__(self, product_id: str, deleted_at: datetime | None, reason: str) -> None:
        self.product_id = product_id
        self.deleted_at = deleted_at
        super().__init__(f"product {product_id} is deleted: {reason}; the event is skipped")


@dataclass(frozen=True)
class Deletion:
    """What one product-deleted event removed; `rows` counts rows per table, cascades aside."""

    product_id: str
    rows: dict[str, int]
    masks: int


def delete_product(
    event: ProductDeleted, *, database_url: str, client: objects.S3Client, bucket: str
) -> Deletion:
    """Rows and tombstone first, then the masks: a failure in between retries both, and the
    second time the rows are already gone."""
    try:
        with database.connect(database_url) as conn:
            rows = delete_rows(conn, event)
    except psycopg.OperationalError as exc:
        raise TransientFault(f"database unavailable or its locks held too long: {exc}") from exc

    masks = delete_masks(client, bucket, event.product_id)
    return Deletion(product_id=event.product_id, rows=rows, masks=masks)


def delete_rows(conn: psycopg.Connection[Any], event: ProductDeleted) -> dict[str, int]:
    """Remove the product's rows and write its tombstone, in one transaction.

    Deleting a product that has no rows, or one already deleted, writes only the tombstone;
    `deleted_at` keeps the latest deletion's time.
    """
    product_id = event.product_id
    with conn.transaction():
        # A session that holds the product's rows and never ends must not stall the task
        # forever: past this the lock wait fails as an OperationalError, which retries.
        conn.execute("SET LOCAL lock_timeout = '30s'")

        # The tombstone goes first, so that the lock below does not trip the guard of a
        # product deleted before; other transactions still see it until this one commits.
        previous = conn.execute(
            "DELETE FROM deleted_products WHERE product_id = %s RETURNING deleted_at",
            (product_id,),
        ).fetchone()

        # Writing the products row waits for an enrichment that is writing it now, and then
        # holds it, so that no enrichment commits rows this transaction cannot see.
        conn.execute(
            "INSERT INTO products (product_id, title) VALUES (%s, '')"
            " ON CONFLICT (product_id) DO UPDATE SET title = products.title",
            (product_id,),
        )
        rows = {
            "attempts": _delete(
                conn,
                "DELETE FROM attempts WHERE event_id IN"
                " (SELECT event_id FROM enrichments WHERE product_id = %s)",
                product_id,
            ),
            "outbox": _delete(
                conn, "DELETE FROM outbox WHERE (body::jsonb ->> 'product_id') = %s", product_id
            ),
        }
        for table in _tables_with_product_id(conn):
            rows[table] = _delete(
                conn,
                sql.SQL("DELETE FROM {} WHERE product_id = %s").format(sql.Identifier(table)),
                product_id,
            )
        _delete(conn, "DELETE FROM products WHERE product_id = %s", product_id)

        conn.execute(
            "INSERT INTO deleted_products (product_id, deleted_at) VALUES (%s, greatest(%s, %s))",
            (product_id, event.occurred_at, None if previous is None else previous[0]),
        )
    return {table: count for table, count in rows.items() if count}


def delete_masks(
    client: objects.S3Client, bucket: str, product_id: str, *, page_size: int = 1000
) -> int:
    """Delete every object under `masks/{product_id}/`, one listing page at a time (S3 lists
    and deletes at most 1,000 keys a call)."""
    prefix = f"masks/{product_id}/"
    deleted = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        ):
            keys: list[ObjectIdentifierTypeDef] = [
                {"Key": item["Key"]} for item in page.get("Contents", [])
            ]
            if keys:
                deleted += _delete_objects(client, bucket, keys)
    except (BotoCoreError, ClientError) as exc:
        raise TransientFault(f"deleting s3://{bucket}/{prefix} failed: {exc}") from exc
    return deleted


def delete_mask_uris(client: objects.S3Client, uris: list[str]) -> int:
    """Delete the given s3:// mask objects: those an enrichment wrote and could not commit."""
    by_bucket: dict[str, list[ObjectIdentifierTypeDef]] = {}
    for uri in uris:
        bucket, key = objects.split_s3_url(uri)
        by_bucket.setdefault(bucket, []).append({"Key": key})

    deleted = 0
    try:
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                deleted += _delete_objects(client, bucket, keys[start : start + 1000])
    except (BotoCoreError, ClientError) as exc:
        raise TransientFault(f"deleting {len(uris)} mask objects failed: {exc}") from exc
    return deleted


def admit_created(conn: psycopg.Connection[Any], event: ProductCreated) -> None:
    """Let a product-created event through, or raise ProductIsDeleted when it is stale.

    An event newer than the product's tombstone is a re-listing: the tombstone goes. A
    backfill's event (`backfill_run_id`) never re-lists, since its occurred_at is the time it
    was submitted, not a new listing. A stale event also forgets its attempt count, so that
    it leaves no row behind. A tombstone without a time (none the worker writes) counts as
    newer than every event.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT deleted_at FROM deleted_products WHERE product_id = %s FOR UPDATE",
            (event.product_id,),
        ).fetchone()
        if row is None:
            return

        deleted_at: datetime | None = row[0]
        newer = deleted_at is not None and event.occurred_at > deleted_at
        if newer and event.backfill_run_id is None:
            conn.execute("DELETE FROM deleted_products WHERE product_id = %s", (event.product_id,))
            log.info("product_relisted", deleted_at=str(deleted_at))
            return

        conn.execute("DELETE FROM attempts WHERE event_id = %s", (event.event_id,))
    deleted = "an unknown time" if deleted_at is None else deleted_at.isoformat()
    reason = (
        f"backfill run {event.backfill_run_id!r} never re-lists a product deleted at {deleted}"
        if newer
        else f"the event occurred at {event.occurred_at.isoformat()}, the deletion at {deleted}"
    )
    raise ProductIsDeleted(event.product_id, deleted_at, reason)


@contextmanager
def refused_when_deleted(product_id: str) -> Iterator[None]:
    """Turn migration 0007's refusal to write a deleted product into ProductIsDeleted."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate != DELETED_SQLSTATE:
            raise
        reason = exc.diag.message_primary or str(exc)
        raise ProductIsDeleted(
            product_id, None, f"deleted while it was enriched ({reason})"
        ) from exc


def _tables_with_product_id(conn: psycopg.Connection[Any]) -> list[str]:
    """Every table of the schema with a product_id column, those added later included."""
    rows = conn.execute(
        "SELECT c.table_name FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " WHERE c.table_schema = current_schema() AND c.column_name = 'product_id'"
        " AND t.table_type = 'BASE TABLE' AND NOT (c.table_name = ANY(%s))"
        " ORDER BY c.table_name",
        (list(_KEPT),),
    ).fetchall()
    return [str(row[0]) for row in rows]


def _delete(conn: psycopg.Connection[Any], statement: Any, product_id: str) -> int:
    return conn.execute(statement, (product_id,)).rowcount


def _delete_objects(
    client: objects.S3Client, bucket: str, keys: list[ObjectIdentifierTypeDef]
) -> int:
    answer: Any = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    errors = answer.get("Errors", [])
    if errors:
        first = errors[0]
        raise TransientFault(
            f"S3 kept {len(errors)} of {len(keys)} objects in {bucket}, e.g. {first.get('Key')}:"
            f" {first.get('Code')} {first.get('Message')}"
        )
    return len(keys)
