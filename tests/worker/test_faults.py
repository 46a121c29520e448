"""Faults against the real servers: killed pool processes and a database outage.

Each test runs a real worker on a few hundred (or dozens of) events and checks, from the
database and from the completion events, that every event was enriched exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import psutil
import pytest

from tests.worker.running import events_for, publish, validation_photos, wait_until
from worker.local import CompletionListener, LocalStack, worker_process
from worker.stores import database


class Server(Protocol):
    def stop(self) -> None: ...
    def start(self) -> object: ...


pytestmark = pytest.mark.slow

EVENTS = 200
KILL_AFTER = (30, 80, 130)
"""Completions after which one pool process is killed with SIGKILL."""


def enrichments_of(stack: LocalStack, events: list[dict[str, Any]]) -> Counter[str]:
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        rows = conn.execute(
            "SELECT event_id::text, status FROM enrichments WHERE event_id = ANY(%s::uuid[])",
            ([e["event_id"] for e in events],),
        ).fetchall()
    return Counter(status for _, status in rows)


def completions_per_event(
    listener: CompletionListener, events: list[dict[str, Any]]
) -> Counter[str]:
    wanted = {e["event_id"] for e in events}
    return Counter(c["causation_id"] for c in listener.received if c["causation_id"] in wanted)


def test_killing_pool_processes_mid_run_loses_and_duplicates_nothing(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    photos = validation_photos(datasets, 40)
    events = events_for(stack, [photos[i % len(photos)] for i in range(EVENTS)])
    kills: list[int] = []

    with (
        CompletionListener(stack.settings) as listener,
        worker_process(stack, tmp_path / "worker.log", concurrency=2) as worker,
    ):
        publish(stack, events)
        for threshold in KILL_AFTER:
            listener.wait_for(threshold, timeout_s=600)
            children = psutil.Process(worker.pid).children()
            victim = children[len(kills) % len(children)].pid
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
        listener.wait_until(
            lambda got: len(completions_per_event(listener, events)) >= EVENTS, timeout_s=900
        )
        listener.wait_until(lambda got: False, timeout_s=5)  # a duplicate would arrive now

    per_event = completions_per_event(listener, events)
    completion_ids = distinct_completions(listener)
    print(
        f"events={EVENTS} kills={len(kills)} completions={sum(per_event.values())} "
        f"missing={EVENTS - len(per_event)} repeated={sum(n > 1 for n in per_event.values())} "
        f"duplicated={sum(len(completion_ids[e['event_id']]) > 1 for e in events)}"
    )
    assert len(kills) == len(KILL_AFTER)
    assert len(per_event) == EVENTS
    # A kill between a relay's publish and its mark sends the same completion again (same
    # event_id, which consumers dedupe on); a second, different completion never appears.
    assert all(len(completion_ids[event["event_id"]]) == 1 for event in events)
    assert enrichments_of(stack, events) == Counter({"enriched": EVENTS})


def distinct_completions(listener: CompletionListener) -> dict[str, set[str]]:
    """The completion event ids received for each product-created event."""
    completion_ids: dict[str, set[str]] = {}
    for completion in listener.received:
        completion_ids.setdefault(completion["causation_id"], set()).add(completion["event_id"])
    return completion_ids


THREADS_EVENTS = 32


def test_killing_a_threads_pool_worker_mid_run_loses_and_duplicates_nothing(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    """Under `--pool threads` the tasks run in the worker process itself: SIGKILL takes all of
    its batches at once, RabbitMQ hands their messages back when the connection drops, and
    a second worker finishes them. Rows are written once; a completion event that a relay
    had sent but not yet marked sent goes out again, with its own event_id (the outbox's
    at-least-once promise), and never as a second, different completion."""
    photos = validation_photos(datasets, 24)
    events = events_for(stack, [photos[i % len(photos)] for i in range(THREADS_EVENTS)])

    with CompletionListener(stack.settings) as listener:
        with worker_process(stack, tmp_path / "first.log", pool="threads", concurrency=8) as first:
            publish(stack, events)
            listener.wait_until(
                lambda got: len(completions_per_event(listener, events)) >= 8, timeout_s=600
            )
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        before_second = len(completions_per_event(listener, events))
        with worker_process(stack, tmp_path / "second.log", pool="threads", concurrency=8):
            listener.wait_until(
                lambda got: len(completions_per_event(listener, events)) >= THREADS_EVENTS,
                timeout_s=900,
            )
            listener.wait_until(lambda got: False, timeout_s=5)  # a duplicate would arrive now

    per_event = completions_per_event(listener, events)
    completion_ids = distinct_completions(listener)
    print(
        f"events={THREADS_EVENTS} before_kill={before_second} "
        f"completions={sum(per_event.values())} missing={THREADS_EVENTS - len(per_event)} "
        f"repeated={sum(n > 1 for n in per_event.values())}"
    )
    assert first.returncode == -signal.SIGKILL
    assert before_second < THREADS_EVENTS, "the kill came after the run"
    assert len(per_event) == THREADS_EVENTS
    assert all(len(completion_ids[event["event_id"]]) == 1 for event in events)
    assert enrichments_of(stack, events) == Counter({"enriched": THREADS_EVENTS})


def enrich_through_an_outage(
    stack: LocalStack, events: list[dict[str, Any]], log_file: Path, server: Server, pause_s: float
) -> Counter[str]:
    """Enrich two events, stop `server`, publish the rest, start it again after `pause_s`;
    returns the completion events per event."""
    with CompletionListener(stack.settings) as listener, worker_process(stack, log_file):
        publish(stack, events[:2])
        listener.wait_until(
            lambda got: len(completions_per_event(listener, events)) >= 2, timeout_s=180
        )
        server.stop()
        publish(stack, events[2:])
        time.sleep(pause_s)
        server.start()
        listener.wait_until(
            lambda got: len(completions_per_event(listener, events)) >= len(events),
            timeout_s=600,
        )
    return completions_per_event(listener, events)


def test_a_database_outage_of_30_seconds_is_retried_and_loses_nothing(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    events = events_for(stack, validation_photos(datasets, 12))

    per_event = enrich_through_an_outage(
        stack, events, tmp_path / "worker.log", stack.postgres, pause_s=30
    )

    assert len(per_event) == len(events) and set(per_event.values()) == {1}
    assert enrichments_of(stack, events) == Counter({"enriched": len(events)})


def test_an_s3_outage_is_retried_and_loses_nothing(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    events = events_for(stack, validation_photos(datasets, 8))

    per_event = enrich_through_an_outage(
        stack, events, tmp_path / "worker.log", stack.s3, pause_s=20
    )

    assert len(per_event) == len(events) and set(per_event.values()) == {1}
    assert enrichments_of(stack, events) == Counter({"enriched": len(events)})


def outbox_of(stack: LocalStack, events: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        rows = conn.execute(
            "SELECT body::jsonb ->> 'causation_id', published_at IS NOT NULL FROM outbox"
            " WHERE body::jsonb ->> 'causation_id' = ANY(%s)",
            ([e["event_id"] for e in events],),
        ).fetchall()
    return [(row[0], bool(row[1])) for row in rows]


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs a local RabbitMQ")
def test_a_rabbitmq_restart_is_survived_and_the_worker_consumes_again(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    events = events_for(stack, validation_photos(datasets, 8))

    with worker_process(stack, tmp_path / "worker.log") as worker:
        publish(stack, events[:4])
        assert wait_until(lambda: sum(enrichments_of(stack, events).values()) >= 2, timeout_s=180)
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True)
        time.sleep(5)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True)
        subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True)
        publish(stack, events[4:])
        finished = wait_until(
            lambda: enrichments_of(stack, events)["enriched"] == len(events), timeout_s=600
        )
        alive = worker.poll() is None

    outbox = outbox_of(stack, events)
    assert alive and finished
    assert sorted(event_id for event_id, _ in outbox) == sorted(e["event_id"] for e in events)
    assert wait_until(lambda: all(sent for _, sent in outbox_of(stack, events)), timeout_s=30)
