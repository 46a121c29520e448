from __future__ import annotations

import uuid

from kombu import Connection

from schemas.events import EnrichmentCompleted, EventType, ModelVersions, Status
from worker.local import CompletionListener, LocalStack
from worker.stores import database, outbox


def completion() -> EnrichmentCompleted:
    return EnrichmentCompleted(
        event_type=EventType.PRODUCT_ENRICHED,
        causation_id=uuid.uuid4(),
        product_id=f"p-{uuid.uuid4().hex[:6]}",
        status=Status.ENRICHED,
        model_versions=ModelVersions(segmentation="s@1", tagging="t@1", embedding="e@1"),
    )


def test_a_stored_event_is_relayed_once_and_then_marked_sent(stack: LocalStack) -> None:
    event = completion()
    url = stack.settings.database_url.get_secret_value()
    broker = stack.settings.broker_url.get_secret_value()

    with CompletionListener(stack.settings) as listener, database.connect(url) as conn:
        with conn.transaction():
            outbox.add(conn, stack.settings.exchange, event)
        confirmed = Connection(broker, transport_options={"confirm_publish": True})
        with confirmed as connection, connection.Producer() as producer:
            first = outbox.relay(conn, producer)
            second = outbox.relay(conn, producer)
        received = listener.wait_until(
            lambda got: any(e["event_id"] == str(event.event_id) for e in got), timeout_s=10
        )

    assert first >= 1 and second == 0
    assert [e["event_id"] for e in received].count(str(event.event_id)) == 1


def test_rows_locked_by_one_relay_are_skipped_by_another(stack: LocalStack) -> None:
    url = stack.settings.database_url.get_secret_value()
    broker = stack.settings.broker_url.get_secret_value()

    with database.connect(url) as holder, database.connect(url) as other:
        with holder.transaction():
            outbox.add(holder, stack.settings.exchange, completion())
        with holder.transaction():
            holder.execute("SELECT * FROM outbox WHERE published_at IS NULL FOR UPDATE")
            with Connection(broker) as connection, connection.Producer() as producer:
                sent_while_locked = outbox.relay(other, producer)
        left = outbox.pending(other)

    assert sent_while_locked == 0
    assert left >= 1
