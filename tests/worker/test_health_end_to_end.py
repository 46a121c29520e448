"""A real worker process: its /metrics count what its pool process did, its probes answer, and
a pool process that stops consuming makes it not live."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.worker.running import (
    events_for,
    http_get,
    json_lines,
    publish,
    validation_photos,
    wait_until,
)
from worker.bench import children_of
from worker.local import CompletionListener, LocalStack, worker_process
from worker.servers import free_port

pytestmark = pytest.mark.slow

CELERY_SHUTDOWN_NOTICE = "worker: Warm shutdown (MainProcess)"
"""Celery prints this to stdout itself, outside logging; every other line is JSON."""


@pytest.fixture
def port(monkeypatch: pytest.MonkeyPatch) -> int:
    chosen = free_port()
    monkeypatch.setenv("ENRICH_METRICS_PORT", str(chosen))
    return chosen


@pytest.fixture
def listener(stack: LocalStack) -> Iterator[CompletionListener]:
    with CompletionListener(stack.settings) as listening:
        yield listening


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def assert_ready(port: int) -> None:
    """Arrange: the worker's models are loaded and its broker and database answer."""
    ready = wait_until(lambda: http_get(port, "/healthz/ready")[0] == 200, timeout_s=300)
    assert ready, http_get(port, "/healthz/ready")[1]


def completed(listener: CompletionListener, events: list[dict[str, Any]]) -> bool:
    wanted = {event["event_id"] for event in events}
    return wanted <= {c["causation_id"] for c in listener.received}


def test_a_ready_worker_counts_its_pool_process_s_enrichments_and_logs_json_with_ids(
    stack: LocalStack, datasets: Path, tmp_path: Path, port: int, listener: CompletionListener
) -> None:
    events = events_for(stack, validation_photos(datasets, 2))
    log_file = tmp_path / "worker.log"

    with worker_process(stack, log_file):
        assert_ready(port)
        publish(stack, events)
        listener.wait_until(lambda _: completed(listener, events), timeout_s=300)
        done = ("enrich_enrichments_done_total", ())
        wait_until(lambda: samples(http_get(port, "/metrics")[1]).get(done) == 2, timeout_s=20)
        scraped = samples(http_get(port, "/metrics")[1])
        live_status, live_body = http_get(port, "/healthz/live")
    logged, not_json = json_lines(log_file)

    assert completed(listener, events)
    assert scraped[done] == 2
    assert scraped[("enrich_events_consumed_total", ())] == 2
    for stage in ("fetch", "segmentation", "tagging", "embedding", "masks"):
        assert scraped[("enrich_stage_seconds_count", (("stage", stage),))] == 2, stage
    assert scraped[("enrich_batch_images_sum", ())] == 2
    assert scraped[("enrich_enrichment_seconds_count", ())] == 2
    assert scraped[("enrich_queue_lag_seconds_count", ())] == 2
    assert scraped[("enrich_model_load_seconds_count", ())] == 1
    assert scraped[("enrich_models_loaded", ())] == 1
    for queue in (stack.settings.intake_queue, stack.settings.task_queue):
        assert scraped[("enrich_queue_messages_ready", (("queue", queue),))] == 0
    assert live_status == 200, live_body
    assert not_json == [CELERY_SHUTDOWN_NOTICE]
    finished = [line for line in logged if line["event"] == "enrichment_finished"]
    assert {line["event_id"] for line in finished} == {e["event_id"] for e in events}
    assert all(line["task_id"] == line["event_id"] for line in finished)
    assert {line["product_id"] for line in finished} == {e["product_id"] for e in events}


def test_a_worker_whose_pool_process_stops_consuming_is_not_live_until_it_moves_again(
    stack: LocalStack,
    datasets: Path,
    tmp_path: Path,
    port: int,
    listener: CompletionListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENRICH_LIVENESS_STALL_S", "5")
    events = events_for(stack, validation_photos(datasets, 3))
    log_file = tmp_path / "worker.log"
    answers: list[tuple[int, bytes]] = []

    def not_live() -> bool:
        answers.append(http_get(port, "/healthz/live"))
        return answers[-1][0] == 503

    with worker_process(stack, log_file) as process:
        assert_ready(port)
        idle_status, _ = http_get(port, "/healthz/live")
        (pool_process,) = children_of(process.pid)
        os.kill(pool_process, signal.SIGSTOP)
        try:
            publish(stack, events)
            wait_until(not_live, timeout_s=60)
        finally:
            os.kill(pool_process, signal.SIGCONT)
        listener.wait_until(lambda _: completed(listener, events), timeout_s=300)
        live_again = wait_until(lambda: http_get(port, "/healthz/live")[0] == 200, timeout_s=60)
    logged, _ = json_lines(log_file)

    status, body = answers[-1]
    assert status == 503
    assert idle_status == 200, "an idle worker with nothing waiting is live"
    assert b'"consumer_tasks": {"ok": false' in body
    assert b'"consumer_intake": {"ok": true' in body
    assert completed(listener, events), "the worker did not finish after SIGCONT"
    assert live_again
    assert any(
        line["event"] == "worker_not_live" and line["stalled"] == ["tasks"] for line in logged
    )
