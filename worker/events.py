"""Publishing to the catalog's topic exchange and to the dead-letter queue.

Events travel as plain JSON (content type application/json), not in Celery's message
format, so that any service can produce and consume them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Exchange, Producer, Queue, binding

from schemas.events import EventType
from schemas.settings import Settings
from worker.errors import DeadLetterKind


def catalog_exchange(settings: Settings) -> Exchange:
    return Exchange(settings.exchange, type="topic", durable=True)


INTAKE_ROUTING_KEYS = (EventType.PRODUCT_CREATED, EventType.PRODUCT_DELETED)
"""The events the intake queue is bound to; the intake tells them apart by `event_type`."""


def intake_queue(settings: Settings) -> Queue:
    exchange = catalog_exchange(settings)
    return Queue(
        settings.intake_queue,
        bindings=[binding(exchange, routing_key=str(key)) for key in INTAKE_ROUTING_KEYS],
        durable=True,
    )


def dead_letter_queue(settings: Settings) -> Queue:
    return Queue(settings.dead_letter_queue, durable=True)


def publish_json(
    producer: Producer,
    body: bytes,
    *,
    exchange: Exchange | str,
    routing_key: str,
    declare: Iterable[Exchange | Queue] = (),
    headers: Mapping[str, Any] | None = None,
) -> None:
    producer.publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=2,
        headers=dict(headers or {}),
        declare=list(declare),
        retry=True,
        retry_policy={"max_retries": 5, "interval_start": 0.5, "interval_step": 1.0},
    )


def dead_letter(
    producer: Producer,
    settings: Settings,
    body: bytes,
    *,
    kind: DeadLetterKind,
    reason: str,
    routing_key: str = "",
) -> None:
    """Park a message with its reason; the body is kept byte for byte for a later replay."""
    queue = dead_letter_queue(settings)
    publish_json(
        producer,
        body,
        exchange="",
        routing_key=queue.name,
        declare=[queue],
        headers={
            "x-error-kind": str(kind),
            "x-error-reason": reason[:2000],
            "x-original-routing-key": routing_key,
            "x-dead-lettered-at": datetime.now(UTC).isoformat(),
        },
    )


def publish_events(connection: Connection, settings: Settings, lines: Iterable[str]) -> int:
    """Publish JSON lines as a producer service would; returns how many were sent."""
    exchange = catalog_exchange(settings)
    count = 0
    with connection.Producer() as producer:
        for line in lines:
            if not line.strip():
                continue
            publish_json(
                producer,
                line.strip().encode(),
                exchange=exchange,
                # Every line goes to the intake, whatever it claims to be: one that is no
                # product-created event is dead-lettered there with its reason, never dropped.
                routing_key=str(EventType.PRODUCT_CREATED),
                declare=[exchange, intake_queue(settings)],
            )
            count += 1
    return count
