"""Health checks: the liveness rule, the broker and database checks, and the HTTP endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Queue
from pydantic import SecretStr

from schemas.settings import Settings
from worker.health import (
    BrokerUnanswered,
    Health,
    HealthServer,
    QueueProbe,
    database_check,
    stalled_consumers,
)
from worker.servers import free_port

BROKER_URL = Settings().broker_url.get_secret_value()


def test_a_consumer_with_messages_ready_and_no_progress_for_longer_than_the_stall_is_stalled() -> (
    None
):
    stalled = stalled_consumers(
        ready={"intake": 0, "tasks": 7},
        heartbeats={"intake": 1000.0, "tasks": 1000.0},
        now=1000.0 + 301,
        stall_s=300,
    )

    assert stalled == ["tasks"]


def test_an_idle_consumer_with_an_empty_queue_is_never_stalled() -> None:
    stalled = stalled_consumers(
        ready={"intake": 0, "tasks": 0},
        heartbeats={"intake": 0.0, "tasks": 0.0},
        now=1e9,
        stall_s=300,
    )

    assert stalled == []


def test_recent_progress_keeps_a_consumer_with_a_backlog_live() -> None:
    stalled = stalled_consumers(
        ready={"tasks": 5000}, heartbeats={"tasks": 1000.0}, now=1000.0 + 299, stall_s=300
    )

    assert stalled == []


@pytest.fixture
def queue_with_three_messages() -> Iterator[str]:
    name = f"health-test.{uuid.uuid4().hex[:8]}"
    with Connection(BROKER_URL) as connection:
        queue = Queue(name, durable=False, auto_delete=False)(connection.default_channel)
        queue.declare()
        with connection.Producer() as producer:
            for n in range(3):
                producer.publish({"n": n}, routing_key=name, serializer="json")
        yield name
        queue.delete()


def test_the_queue_probe_counts_ready_messages_on_the_broker(
    queue_with_three_messages: str,
) -> None:
    probe = QueueProbe(BROKER_URL, timeout_s=3)

    counts = probe.ready_messages([queue_with_three_messages])
    probe.close()

    assert counts == {queue_with_three_messages: 3}


def test_the_queue_probe_raises_where_no_broker_answers() -> None:
    probe = QueueProbe(f"amqp://guest:guest@127.0.0.1:{free_port()}//", timeout_s=1)

    with pytest.raises(BrokerUnanswered, match="refused"):
        probe.ready_messages(["any"])


def test_the_database_check_fails_with_the_reason_where_no_database_answers() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/enrichment"

    check = database_check(url, timeout_s=1)

    assert not check.ok
    assert check.name == "database"
    assert check.detail.startswith("unreachable:")


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HealthServer]:
    """A health server for a worker whose database is down and whose queues are empty."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        database_url=SecretStr(f"postgresql://postgres@127.0.0.1:{free_port()}/enrichment"),
        intake_queue=f"health-test.intake.{run}",
        task_queue=f"health-test.tasks.{run}",
        backfill_queue=f"health-test.backfill.{run}",
        health_timeout_s=2,
    )
    queues = (settings.intake_queue, settings.task_queue, settings.backfill_queue)
    with Connection(BROKER_URL) as connection:
        for name in queues:
            Queue(name, auto_delete=True)(connection.default_channel).declare()
        started = HealthServer(Health.from_settings(settings, tmp_path), host="127.0.0.1", port=0)
        started.start()
        yield started
        started.stop()
        for name in queues:
            # Never consumed, so auto_delete never fires: delete them here.
            connection.default_channel.queue_delete(name)


def test_readiness_is_503_and_names_the_models_and_the_database_when_they_are_missing(
    server: HealthServer,
) -> None:
    status, body = get(server.port, "/healthz/ready")

    assert status == 503
    assert body["status"] == "failing"
    failing = {name for name, check in body["checks"].items() if not check["ok"]}
    assert failing == {"models", "database"}
    assert body["checks"]["broker"] == {"ok": True, "detail": "answers"}


def test_liveness_is_200_while_the_worker_has_nothing_waiting(server: HealthServer) -> None:
    status, body = get(server.port, "/healthz/live")

    assert status == 200
    assert set(body["checks"]) == {"consumer_intake", "consumer_tasks"}


def test_backfill_work_left_waiting_makes_the_task_consumer_not_live(
    server: HealthServer,
) -> None:
    backfill = server.health.settings.backfill_queue
    with Connection(BROKER_URL) as connection, connection.Producer() as producer:
        producer.publish({"chunk": 1}, routing_key=backfill, exchange="", retry=True)

    status, body = get(server.port, "/healthz/live")
    metrics = server.health.metrics_text().decode()

    assert status == 503
    assert body["checks"]["consumer_tasks"]["ok"] is False
    assert body["checks"]["consumer_intake"]["ok"] is True
    assert f'enrich_queue_messages_ready{{queue="{backfill}"}} 1.0' in metrics


def test_liveness_is_200_during_a_shutdown_whatever_waits(server: HealthServer) -> None:
    server.health.stopping.set()

    status, body = get(server.port, "/healthz/live")
    ready_status, ready = get(server.port, "/healthz/ready")

    assert status == 200
    assert body["checks"]["consumers"]["detail"] == "the worker is shutting down"
    assert ready_status == 503
    assert ready["checks"]["running"]["ok"] is False


def test_an_unknown_path_is_404(server: HealthServer) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/nothing")

    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5)

    assert raised.value.code == 404
