"""Faults against the real servers: killed pool processes and a database outage.

Each test runs a real worker on a few hundred (or dozens of) events and checks, from the
database and from the completion events, that every event was enriched exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.worker.running import events_for, publish, validation_photos, wait_until
from worker.local import CompletionListener, LocalStack, worker_process
from worker.stores import database

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
    print(
        f"events={EVENTS} kills={len(kills)} completions={sum(per_event.values())} "
        f"missing={EVENTS - len(per_event)} duplicated={sum(n > 1 for n in per_event.values())}"
    )
    assert len(kills) == len(KILL_AFTER)
    assert len(per_event) == EVENTS
    assert set(per_event.values()) == {1}
    assert enrichments_of(stack, events) == Counter({"enriched": EVENTS})


def test_a_database_outage_of_30_seconds_is_retried_and_loses_nothing(
    stack: LocalStack, datasets: Path, tmp_path: Path
) -> None:
    events = events_for(stack, validation_photos(datasets, 12))

    with (
        CompletionListener(stack.settings) as listener,
        worker_process(stack, tmp_path / "worker.log") as _,
    ):
        publish(stack, events[:2])
        listener.wait_until(
            lambda got: len(completions_per_event(listener, events)) >= 2, timeout_s=180
        )
        stack.postgres.stop()
        publish(stack, events[2:])
        time.sleep(30)
        stack.postgres.start()
        listener.wait_until(
            lambda got: len(completions_per_event(listener, events)) >= len(events),
            timeout_s=600,
        )

    per_event = completions_per_event(listener, events)
    assert len(per_event) == len(events) and set(per_event.values()) == {1}
    assert wait_until(
        lambda: enrichments_of(stack, events)["enriched"] == len(events), timeout_s=10
    )
