"""One exception class per outcome. `worker.tasks` maps each to what happens to the message.

- InvalidEvent: the event breaks its contract; dead-lettered, never retried.
- UnreadableImage: an image cannot be fetched for good or decoded; the enrichment is
  recorded as failed and the event dead-lettered with the reason.
- TransientFault: a server is briefly unavailable; the task retries with backoff.
- handlers.base.StageError: a model stage failed on its input; recorded as a failed
  enrichment.
"""

from __future__ import annotations

from typing import Any

_VALUE_PREVIEW = 80


def preview(value: Any) -> str:
    """The received value as shown in an error: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _VALUE_PREVIEW else text[: _VALUE_PREVIEW - 3] + "..."


class InvalidEvent(Exception):
    """The message is not a valid event. `field` is a dotted path, or `body` for bad JSON."""

    kind = "invalid_event"

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = preview(value)
        self.allowed = allowed
        super().__init__(
            f"field {field!r} received {self.value}; allowed: {allowed}; "
            "the message was dead-lettered and will not be retried"
        )


class UnreadableImage(Exception):
    kind = "unreadable_image"

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"image {preview(url)} cannot be read: {reason}")


class TransientFault(Exception):
    """A server did not answer or answered with a temporary error; worth retrying."""

    kind = "transient_fault"
