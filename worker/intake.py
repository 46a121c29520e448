"""Event intake: plain JSON product-created events in, Celery enrichment work out.

A consumer step inside the Celery worker's own consumer reads the worker's durable queue on
the catalog exchange. A valid event becomes an `enrich_product` task; anything else goes to
the dead-letter queue with its reason. The message is acknowledged only after either.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from celery import bootsteps
from kombu import Consumer, Message
from kombu.transport.base import StdChannel
from pydantic import ValidationError

from schemas.events import ProductCreated
from schemas.settings import get_settings
from worker import metrics
from worker.errors import InvalidEvent
from worker.events import dead_letter, intake_queue

log = structlog.get_logger(__name__)


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()


def parse_event(body: bytes | str) -> ProductCreated:
    """Validate one message body; InvalidEvent names the first offending field."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent("body", body, f"a JSON object ({exc})") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("body", payload, "a JSON object")

    try:
        return ProductCreated.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        value = _MISSING if error["type"] == "missing" else error.get("input")
        raise InvalidEvent(field, value, error["msg"]) from exc


class IntakeStep(bootsteps.ConsumerStep):
    """Consumes the intake queue in the worker's main process; it never loads models."""

    def get_consumers(self, channel: StdChannel) -> list[Consumer]:
        queue = intake_queue(get_settings())
        return [Consumer(channel, queues=[queue], on_message=self.on_message, prefetch_count=10)]

    def on_message(self, message: Message) -> None:
        from worker.tasks import enrich_product

        try:
            event = parse_event(message.body)
        except InvalidEvent as exc:
            self._reject(message, exc)
            return

        enrich_product.apply_async(
            kwargs={"event": event.model_dump(mode="json")}, task_id=str(event.event_id)
        )
        log.debug("event_accepted", event_id=str(event.event_id), product_id=event.product_id)
        message.ack()

    def _reject(self, message: Message, exc: InvalidEvent) -> None:
        settings = get_settings()
        routing_key = str(message.delivery_info.get("routing_key", ""))
        with self._producer() as producer:
            dead_letter(
                producer,
                settings,
                _raw(message),
                kind=exc.kind,
                reason=str(exc),
                routing_key=routing_key,
            )
        metrics.consumer_heartbeat(metrics.Consumer.INTAKE)
        log.warning(
            "event_rejected",
            field=exc.field,
            value=exc.value,
            allowed=exc.allowed,
            outcome="dead_lettered",
        )
        message.ack()

    def _producer(self) -> Any:
        from worker.app import app

        return app.producer_or_acquire()


def _raw(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()
