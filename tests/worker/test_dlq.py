from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from kombu import Connection

from schemas.settings import Settings
from tests.schemas.test_events import product_payload
from worker.dlq import list_dead_letters, replay
from worker.errors import DeadLetterKind
from worker.events import dead_letter, intake_queue
from worker.local import LocalStack, delete_queues


def park(settings: Settings, body: bytes, kind: DeadLetterKind) -> None:
    with (
        Connection(settings.broker_url.get_secret_value()) as connection,
        connection.Producer() as producer,
    ):
        dead_letter(
            producer,
            settings,
            body,
            kind=kind,
            reason=f"{kind} for a test",
            routing_key="product.created",
        )


@pytest.fixture
def settings(stack: LocalStack, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Queues of this test's own, deleted afterwards."""
    suffix = f"{stack.run_id}.{request.node.name}"
    isolated = stack.settings.model_copy(
        update={
            "dead_letter_queue": f"dlq.{suffix}",
            "intake_queue": f"intake.{suffix}",
            "task_queue": f"tasks.{suffix}",
        }
    )
    yield isolated
    delete_queues(isolated)


def test_listing_shows_kind_and_reason_and_leaves_messages_parked(settings: Settings) -> None:
    park(settings, b"{not json", DeadLetterKind.INVALID_EVENT)

    first = list_dead_letters(settings)
    second = list_dead_letters(settings)

    assert [(d.kind, d.reason) for d in first] == [("invalid_event", "invalid_event for a test")]
    assert [d.body for d in second] == [b"{not json"]


def test_replay_by_kind_sends_only_that_kind_back_to_the_intake(settings: Settings) -> None:
    event = json.dumps(product_payload()).encode()
    park(settings, event, DeadLetterKind.UNREADABLE_IMAGE)
    park(settings, b"{not json", DeadLetterKind.INVALID_EVENT)
    with Connection(settings.broker_url.get_secret_value()) as connection:
        intake = intake_queue(settings)(connection.channel())
        intake.declare()
        intake.purge()

        replayed = replay(settings, kind=DeadLetterKind.UNREADABLE_IMAGE)
        arrived = intake.get(no_ack=True)
        left = list_dead_letters(settings)

    assert replayed == 1
    assert arrived is not None and arrived.body in (event, event.decode())
    assert [d.kind for d in left] == ["invalid_event"]
