"""The Celery app: Celery's settings from celeryconfig, the intake step, process set-up."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import structlog
from celery import Celery, signals

from handlers.base import ModelLoadError
from schemas.settings import get_settings
from worker.errors import TransientFault
from worker.health import HealthStep
from worker.intake import IntakeStep
from worker.logging import configure_logging
from worker.signals import connect as connect_signals

_MAIN_PID = os.getpid()
"""The worker's main process: prefork's pool processes are forked from it and inherit this."""

app = Celery("catalog_enrichment", include=["worker.tasks"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(IntakeStep)
app.steps["worker"].add(HealthStep)
connect_signals()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_ready.connect
def _load_models_in_threads_pool(sender: Any = None, **_: Any) -> None:
    """A threads or solo pool runs tasks in this process, where no worker_process_init
    comes: load the models here, in the background, so that the consumer keeps its
    heartbeats (the first task waits for them under process_resources' lock)."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if isinstance(getattr(sender, "pool", None), PreforkPool):
        return
    threading.Thread(target=_load_models_or_stop, name="load-models", daemon=True).start()


def _load_models_or_stop() -> None:
    from worker.tasks import process_resources

    try:
        process_resources()
    except ModelLoadError:
        structlog.get_logger(__name__).critical("worker_cannot_start", exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)
    except TransientFault as exc:
        _log_servers_unavailable(exc)


def _log_servers_unavailable(exc: TransientFault) -> None:
    """A server down at start is no reason to stop: readiness says so, and each task sets
    up again, the models already loaded, and retries until the server is back."""
    structlog.get_logger(__name__).warning(
        "worker_started_without_servers", reason=str(exc), outcome="tasks_retry"
    )


@signals.worker_process_init.connect
def _load_models_after_fork(**_: Any) -> None:
    """Each pool process loads its own models once, after the fork (CUDA cannot cross it).

    A model that cannot load stops the whole worker: a pool that respawns processes which
    cannot work would only take messages and hand them back. The solo pool sends this signal
    in the main process itself, which `_load_models_in_threads_pool` serves instead.
    """
    from worker.tasks import process_resources

    if os.getpid() == _MAIN_PID:
        return
    try:
        process_resources()
    except ModelLoadError:
        structlog.get_logger(__name__).critical("worker_cannot_start", exc_info=True)
        os.kill(_MAIN_PID, signal.SIGTERM)
        raise
    except TransientFault as exc:
        _log_servers_unavailable(exc)
