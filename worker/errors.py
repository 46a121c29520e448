"""One exception class per outcome. `worker.tasks` maps each to what happens to the message.

- InvalidEvent: the event breaks its contract; dead-lettered, never retried.
- UnreadableImage: an image cannot be fetched for good or decoded; the enrichment is
  recorded as failed and the event dead-lettered with the reason.
- TransientFault: a server is briefly unavailable; the task retries with backoff.
- handlers.base.StageError: a model stage failed on its input; recorded as a failed
  enrichment.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

_VALUE_PREVIEW = 80


class DeadLetterKind(StrEnum):
    """Why a message was parked: the `x-error-kind` header and `enrich dlq replay --reason`."""

    INVALID_EVENT = "invalid_event"
    UNREADABLE_IMAGE = "unreadable_image"
    UNEXPECTED = "unexpected"
    ABANDONED = "abandoned"
    INVALID_BACKFILL = "invalid_backfill"
    ABANDONED_BACKFILL_CHUNK = "abandoned_backfill_chunk"


def preview(value: Any) -> str:
    """The received value as shown in an error: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _VALUE_PREVIEW else text[: _VALUE_PREVIEW - 3] + "..."


class InvalidEvent(Exception):
    """The message is not a valid event. `field` is a dotted path, or `body` for bad JSON.

    `event_id` and `product_id` are the ids the message carried, as text cut short, where it
    had them, so that a rejection can be traced to its producer.
    """

    kind = DeadLetterKind.INVALID_EVENT

    def __init__(
        self,
        field: str,
        value: Any,
        allowed: str,
        *,
        event_id: str | None = None,
        product_id: str | None = None,
    ) -> None:
        self.field = field
        self.value = preview(value)
        self.allowed = allowed
        self.event_id = event_id
        self.product_id = product_id
        super().__init__(
            f"field {field!r} received {self.value}; allowed: {allowed}; "
            "the message was dead-lettered and will not be retried"
        )


class UnreadableImage(Exception):
    kind = DeadLetterKind.UNREADABLE_IMAGE

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"image {preview(url)} cannot be read: {reason}")


class TransientFault(Exception):
    """A server did not answer or answered with a temporary error; worth retrying."""

    kind = "transient_fault"
