"""Celery signal receivers: they feed the metrics and the health checks, and keep the log JSON.

`connect` is called once by worker.app. A receiver runs in the process that sends its signal:
import_modules, after_task_publish, worker_shutting_down and worker_shutdown in the main
process; task_prerun, task_postrun and worker_process_shutdown in a pool process.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from celery import signals

from schemas.settings import get_settings
from worker import health, metrics
from worker.logging import configure_logging
from worker.metrics import Consumer

log = structlog.get_logger(__name__)

ENRICH_TASK = "enrichment.enrich_product"
"""worker.tasks.enrich_product's name; that module imports this one through worker.app."""


def connect() -> None:
    signals.import_modules.connect(_log_from_the_start, weak=False)
    signals.celeryd_after_setup.connect(_quiet_banner, weak=False)
    signals.after_task_publish.connect(_event_accepted, weak=False)
    signals.task_prerun.connect(_task_heartbeat, weak=False)
    signals.task_postrun.connect(_task_finished, weak=False)
    signals.worker_process_shutdown.connect(_process_exited, weak=False)
    signals.worker_shutting_down.connect(_shutting_down, weak=False)
    signals.worker_shutdown.connect(_stopped, weak=False)


def _log_from_the_start(**_: Any) -> None:
    """Before the worker imports the task modules, whose libraries warn and draw progress
    bars as they load: from here on every line is a log event (Celery's own `setup_logging`
    comes later)."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    logging.captureWarnings(True)
    if _logs_json():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_banner(instance: Any = None, **_: Any) -> None:
    """Celery prints a banner of plain text at start; a JSON log has every line JSON."""
    if instance is not None and _logs_json():
        instance.quiet = True


def _logs_json() -> bool:
    log_json = get_settings().log_json
    return not sys.stderr.isatty() if log_json is None else log_json


def _event_accepted(sender: str | None = None, headers: Any = None, **_: Any) -> None:
    """The intake step turned an event into a task; a task's own retry is no new event."""
    if sender == ENRICH_TASK and not (headers or {}).get("retries"):
        metrics.event_accepted()


def _task_heartbeat(**_: Any) -> None:
    metrics.consumer_heartbeat(Consumer.TASKS)


def _task_finished(**_: Any) -> None:
    metrics.consumer_heartbeat(Consumer.TASKS)
    metrics.gpu_memory()
    # The task's ids end with it: a solo pool runs tasks in the thread that later logs the
    # worker's own events, such as its shutdown.
    structlog.contextvars.clear_contextvars()


def _process_exited(pid: int | None = None, **_: Any) -> None:
    if pid is not None:
        metrics.process_exited(pid)


def _shutting_down(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    log.info("worker_shutting_down", signal=sig, how=how)
    health.mark_stopping()


def _stopped(**_: Any) -> None:
    health.shutdown()
    metrics.close()
