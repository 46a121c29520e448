"""The dead-letter queue: what was parked and why, and sending it back after a fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from kombu import Connection

from schemas.events import EventType
from schemas.settings import Settings
from worker.errors import DeadLetterKind
from worker.events import catalog_exchange, dead_letter_queue, intake_queue, publish_json

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    kind: str
    reason: str
    routing_key: str
    dead_lettered_at: str
    body: bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "reason": self.reason,
            "routing_key": self.routing_key,
            "dead_lettered_at": self.dead_lettered_at,
            "body": self.body.decode(errors="replace"),
        }


def _dead_letter(message: Any) -> DeadLetter:
    headers = message.headers or {}
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return DeadLetter(
        kind=str(headers.get("x-error-kind", "unknown")),
        reason=str(headers.get("x-error-reason", "")),
        routing_key=str(headers.get("x-original-routing-key", "")),
        dead_lettered_at=str(headers.get("x-dead-lettered-at", "")),
        body=body,
    )


def list_dead_letters(settings: Settings, *, limit: int = 1000) -> list[DeadLetter]:
    """Read up to `limit` parked messages and put them all back, in order."""
    with Connection(settings.broker_url.get_secret_value()) as connection:
        channel = connection.channel()
        queue = dead_letter_queue(settings)(channel)
        queue.declare()
        taken: list[Any] = []
        while len(taken) < limit and (message := queue.get(no_ack=False)) is not None:
            taken.append(message)
        letters = [_dead_letter(message) for message in taken]
        for message in taken:
            message.requeue()
    return letters


def replay(settings: Settings, *, kind: DeadLetterKind | None = None, limit: int = 100_000) -> int:
    """Send parked messages (of one kind, or all) back to the catalog exchange.

    Each message is acknowledged only after its copy was confirmed by the broker; messages
    of other kinds go back to the queue untouched. Returns how many were replayed.
    """
    url = settings.broker_url.get_secret_value()
    exchange = catalog_exchange(settings)
    replayed = 0
    with Connection(url, transport_options={"confirm_publish": True}) as connection:
        channel = connection.channel()
        queue = dead_letter_queue(settings)(channel)
        queue.declare()
        skipped: list[Any] = []
        producer = connection.Producer()
        while replayed + len(skipped) < limit and (message := queue.get(no_ack=False)):
            letter = _dead_letter(message)
            if kind is not None and letter.kind != kind:
                skipped.append(message)
                continue
            publish_json(
                producer,
                letter.body,
                exchange=exchange,
                routing_key=letter.routing_key or str(EventType.PRODUCT_CREATED),
                declare=[exchange, intake_queue(settings)],
            )
            message.ack()
            replayed += 1
        for message in skipped:
            message.requeue()

    log.info("dead_letters_replayed", count=replayed, kind=kind)
    return replayed
