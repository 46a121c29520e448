"""Event intake: plain JSON product events in, Celery work out.

A consumer step inside the Celery worker's own consumer reads the worker's durable queue on
the catalog exchange. A valid product-created event becomes an `enrich_product` task, a valid
product-deleted event a `delete_product` task (told apart by `event_type`); anything else goes
to the dead-letter queue with its reason. The message is acknowledged only after either.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import structlog
from celery import bootsteps
from kombu import Consumer, Message
from kombu.transport.base import StdChannel
from pydantic import ValidationError

from schemas.events import EventType, ProductCreated, ProductDeleted
from schemas.settings import get_settings
from worker import metrics
from worker.errors import InvalidEvent
from worker.events import dead_letter, intake_queue

log = structlog.get_logger(__name__)


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()
_ID_PREVIEW = 80
_Event = TypeVar("_Event", ProductCreated, ProductDeleted)


def parse_event(body: bytes | str) -> ProductCreated:
    """Validate one product-created body; InvalidEvent names the first offending field."""
    return _validate(ProductCreated, _json_object(body))


def parse_intake_event(body: bytes | str) -> ProductCreated | ProductDeleted:
    """Validate one intake message: a product-deleted event when `event_type` says so, else
    a product-created event (whose errors name the field, as `parse_event`'s do)."""
    payload = _json_object(body)
    event_type = payload.get("event_type", _MISSING)
    if event_type == EventType.PRODUCT_DELETED:
        return _validate(ProductDeleted, payload)
    if event_type != EventType.PRODUCT_CREATED:
        allowed = f"{EventType.PRODUCT_CREATED} or {EventType.PRODUCT_DELETED}"
        raise InvalidEvent("event_type", event_type, allowed, **_ids(payload))
    return _validate(ProductCreated, payload)


def _json_object(body: bytes | str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent("body", body, f"a JSON object ({exc})") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("body", payload, "a JSON object")
    return payload


def _validate(model: type[_Event], payload: dict[str, Any]) -> _Event:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        value = _MISSING if error["type"] == "missing" else error.get("input")
        raise InvalidEvent(field, value, error["msg"], **_ids(payload)) from exc


def _ids(payload: dict[str, Any]) -> dict[str, str | None]:
    """The event and product ids an invalid payload carried, as text cut short, for the log."""
    ids: dict[str, str | None] = {}
    for name in ("event_id", "product_id"):
        value = payload.get(name)
        ids[name] = str(value)[:_ID_PREVIEW] if isinstance(value, str | int) else None
    return ids


class IntakeStep(bootsteps.ConsumerStep):
    """Consumes the intake queue in the worker's main process; it never loads models."""

    def get_consumers(self, channel: StdChannel) -> list[Consumer]:
        queue = intake_queue(get_settings())
        return [Consumer(channel, queues=[queue], on_message=self.on_message, prefetch_count=10)]

    def on_message(self, message: Message) -> None:
        from worker.tasks import delete_product, enrich_product

        try:
            event = parse_intake_event(message.body)
        except InvalidEvent as exc:
            self._reject(message, exc)
            return

        task = delete_product if isinstance(event, ProductDeleted) else enrich_product
        task.apply_async(
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
            event_id=exc.event_id,
            product_id=exc.product_id,
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
