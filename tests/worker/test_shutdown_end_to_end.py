"""SIGTERM during a run: the worker finishes the batch it holds and hands back what it had not
started; a second worker finishes the rest, and every event ends with exactly one completion."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.worker.running import (
    events_for,
    json_lines,
    publish,
    validation_photos,
    wait_until,
)
from worker.local import CompletionListener, LocalStack, worker_process
from worker.stores import database

pytestmark = pytest.mark.slow

EVENTS = 12
FINISHED_BEFORE_SIGTERM = 3


def tasks_received(log_file: Path) -> int:
    logged, _ = json_lines(log_file)
    return sum(1 for line in logged if str(line["event"]).endswith("] received"))


def test_sigterm_mid_run_loses_no_event_and_a_second_worker_finishes_the_rest(
    stack: LocalStack, datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENRICH_METRICS_PORT", "0")
    events = events_for(stack, validation_photos(datasets, EVENTS))
    wanted = {event["event_id"] for event in events}
    first_log = tmp_path / "first.log"

    def mine(listener: CompletionListener) -> list[str]:
        return [c["causation_id"] for c in listener.received if c["causation_id"] in wanted]

    with CompletionListener(stack.settings) as listener:
        with worker_process(stack, first_log) as first:
            publish(stack, events)
            enough = FINISHED_BEFORE_SIGTERM
            listener.wait_until(lambda _: len(mine(listener)) >= enough, timeout_s=300)
            in_flight = wait_until(
                lambda: tasks_received(first_log) > len(mine(listener)), timeout_s=60, every_s=0.1
            )
            before_sigterm = len(mine(listener))
            first.send_signal(signal.SIGTERM)
            exit_code = first.wait(timeout=120)
        listener.wait_until(lambda _: len(mine(listener)) > before_sigterm, timeout_s=10)
        after_first = len(mine(listener))

        with worker_process(stack, tmp_path / "second.log"):
            listener.wait_until(lambda _: set(mine(listener)) == wanted, timeout_s=300)
            listener.wait_until(lambda _: len(mine(listener)) > EVENTS, timeout_s=5)
        completions = Counter(mine(listener))

    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        rows = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'enriched') FROM enrichments"
            " WHERE event_id = ANY(%s)",
            (list(wanted),),
        ).fetchone()
    first_logged, _ = json_lines(first_log)
    lost = len(wanted - set(completions))
    duplicated = sum(completions.values()) - len(completions)
    print(
        f"completions: {before_sigterm} before SIGTERM, {after_first - before_sigterm} while the"
        f" first worker drained, {sum(completions.values()) - after_first} by the second one;"
        f" {lost} lost, {duplicated} duplicated"
    )

    assert exit_code == 0
    assert any(
        line["event"] == "worker_shutting_down" and line["how"] == "Warm" for line in first_logged
    )
    assert in_flight and after_first - before_sigterm >= 1, "no batch was running at SIGTERM"
    assert after_first < EVENTS, "SIGTERM came after the run"
    assert lost == 0 and set(completions) == wanted
    assert duplicated == 0
    assert rows == (EVENTS, EVENTS)
