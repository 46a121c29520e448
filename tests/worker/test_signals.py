from __future__ import annotations

import structlog
from celery import signals

import worker.app  # noqa: F401  (connects the worker's signal handlers)


def test_a_finished_task_leaves_no_ids_bound_for_the_worker_s_own_log_lines() -> None:
    structlog.contextvars.bind_contextvars(event_id="e-1", product_id="p-1", task_id="t-1")

    signals.task_postrun.send(sender=None)

    assert structlog.contextvars.get_contextvars() == {}
