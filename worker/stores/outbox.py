"""The transactional outbox: events are stored with the rows they announce, then relayed.

A crash between the database commit and the publish loses nothing: the event waits in the
outbox until the next relay. Relays lock the rows they send (SKIP LOCKED), so that two
workers never send the same row at once.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from kombu import Exchange, Producer

from schemas.events import EnrichmentCompleted
from worker.events import publish_json

log = structlog.get_logger(__name__)


def add(conn: psycopg.Connection[Any], exchange: str, event: EnrichmentCompleted) -> None:
    """Store an event; call inside the transaction that writes what it announces."""
    conn.execute(
        "INSERT INTO outbox (event_id, exchange, routing_key, body) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (event_id) DO NOTHING",
        (event.event_id, exchange, event.routing_key, event.model_dump_json()),
    )


def relay(conn: psycopg.Connection[Any], producer: Producer, *, limit: int = 100) -> int:
    """Publish pending events in order, then mark them sent; returns how many were sent.

    The producer's connection must use publisher confirms, so that a row is marked sent only
    once RabbitMQ has the message. A crash between the confirm and the commit sends that row
    again on the next relay: consumers see at most a repeat with the same event_id.
    """
    with conn.transaction():
        rows = conn.execute(
            "SELECT outbox_id, exchange, routing_key, body FROM outbox"
            " WHERE published_at IS NULL ORDER BY outbox_id LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        ).fetchall()
        for _, exchange_name, routing_key, body in rows:
            exchange = Exchange(exchange_name, type="topic", durable=True)
            publish_json(
                producer,
                body.encode(),
                exchange=exchange,
                routing_key=routing_key,
                declare=[exchange],
            )
        if rows:
            conn.execute(
                "UPDATE outbox SET published_at = now() WHERE outbox_id = ANY(%s)",
                ([row[0] for row in rows],),
            )

    if rows:
        log.debug("outbox_relayed", events=len(rows))
    return len(rows)


def pending(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    return int(row[0]) if row else 0
