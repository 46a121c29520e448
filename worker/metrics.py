"""A worker's Prometheus metrics, and the functions that record them.

A prefork worker runs its tasks in pool processes but serves /metrics from its main process.
prometheus_client's multiprocess mode joins the two: every process writes its values to
files in one folder, and the main process adds the files up when scraped. `prepare`, called
by the main process before the pool forks, names the folder and defines the metrics; until
then the functions here that record do nothing, so the demo and the tests run the same
enrichment code without metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STAGE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LAG_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 20)
MODEL_LOAD_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Consumer(StrEnum):
    """Label values of the heartbeat gauge: who takes messages off which queue."""

    INTAKE = "intake"
    TASKS = "tasks"


@dataclass(frozen=True)
class WorkerMetrics:
    events_consumed: Counter
    enrichments_done: Counter
    enrichments_failed: Counter
    enrichments_duplicate: Counter
    enrichments_retried: Counter
    enrichment_seconds: Histogram
    stage_seconds: Histogram
    batch_images: Histogram
    queue_lag_seconds: Histogram
    model_load_seconds: Histogram
    models_loaded: Gauge
    gpu_memory_bytes: Gauge
    heartbeat: Gauge


def define(registry: CollectorRegistry | None) -> WorkerMetrics:
    """Every metric of a worker. In multiprocess mode `registry` is None: the main process
    reads the metric files instead of a registry."""
    from prometheus_client import Counter, Gauge, Histogram

    return WorkerMetrics(
        events_consumed=Counter(
            "enrich_events_consumed",
            "Product events taken off the intake queue and turned into enrichment tasks.",
            registry=registry,
        ),
        enrichments_done=Counter(
            "enrich_enrichments_done", "Enrichments written as enriched.", registry=registry
        ),
        enrichments_failed=Counter(
            "enrich_enrichments_failed",
            "Enrichments written as failed, by reason (the error kind).",
            ["reason"],
            registry=registry,
        ),
        enrichments_duplicate=Counter(
            "enrich_enrichments_duplicate",
            "Events enriched again after a redelivery; nothing was written or sent twice.",
            registry=registry,
        ),
        enrichments_retried=Counter(
            "enrich_enrichments_retried",
            "Enrichment tasks sent back for a retry, by reason.",
            ["reason"],
            registry=registry,
        ),
        enrichment_seconds=Histogram(
            "enrich_enrichment_seconds",
            "Time of one product's stages, fetch to masks written.",
            buckets=STAGE_BUCKETS_S,
            registry=registry,
        ),
        stage_seconds=Histogram(
            "enrich_stage_seconds",
            "Time of one stage for one product.",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=registry,
        ),
        batch_images=Histogram(
            "enrich_batch_images",
            "Images given to the segmentation and tagging models in one batch (one product).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        queue_lag_seconds=Histogram(
            "enrich_queue_lag_seconds",
            "From the event's occurred_at to the start of its first enrichment attempt.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        ),
        model_load_seconds=Histogram(
            "enrich_model_load_seconds",
            "Time for a pool process to load all three models.",
            buckets=MODEL_LOAD_BUCKETS_S,
            registry=registry,
        ),
        models_loaded=Gauge(
            "enrich_models_loaded",
            "Pool processes whose models are loaded.",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        gpu_memory_bytes=Gauge(
            "enrich_gpu_memory_bytes",
            "CUDA memory of a pool process, by device and kind (allocated, reserved, peak).",
            ["device", "kind"],
            registry=registry,
            multiprocess_mode="liveall",
        ),
        heartbeat=Gauge(
            "enrich_consumer_heartbeat_timestamp_seconds",
            "Unix time a consumer last made progress (intake: event taken; tasks: task ran).",
            ["consumer"],
            registry=registry,
            multiprocess_mode="max",
        ),
    )


_metrics: WorkerMetrics | None = None
_folder: Path | None = None
_made_folder = False


def prepare(folder: Path | None) -> Path:
    """Switch this process to multiprocess mode and define the metrics.

    Called once in the worker's main process, before the pool forks: the pool processes
    inherit the metrics and write to their own files in `folder` (a new temporary folder when
    None). Files left by an earlier worker are removed, so that counters start at zero.
    """
    global _metrics, _folder, _made_folder
    _made_folder = folder is None
    folder = folder or Path(tempfile.mkdtemp(prefix="enrich-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)

    # prometheus_client picks in-memory or file-backed values when it is first imported, and
    # has no call to choose later (prometheus/client_python#701). Celery's command line
    # imports it before this, through Flower's plugin, so the choice is made again here,
    # before any metric of this module exists.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _metrics, _folder = define(registry=None), folder
    return folder


def folder() -> Path | None:
    """The multiprocess folder, or None where `prepare` was not called."""
    return _folder


def event_accepted() -> None:
    if _metrics is None:
        return
    _metrics.events_consumed.inc()
    _metrics.heartbeat.labels(Consumer.INTAKE).set(time.time())


def consumer_heartbeat(consumer: str) -> None:
    if _metrics is not None:
        _metrics.heartbeat.labels(consumer).set(time.time())


def event_started(occurred_at: datetime, *, attempt: int) -> None:
    """An enrichment task starts; the lag is counted on the first attempt only."""
    if _metrics is None or attempt > 0:
        return
    lag_s = (datetime.now(UTC) - occurred_at).total_seconds()
    _metrics.queue_lag_seconds.observe(max(0.0, lag_s))


def batch_started(num_images: int) -> None:
    if _metrics is not None:
        _metrics.batch_images.observe(num_images)


def stage_finished(stage: str, duration_ms: float) -> None:
    if _metrics is not None:
        _metrics.stage_seconds.labels(stage).observe(duration_ms / 1000)


def enrichment_timed(duration_ms: float) -> None:
    if _metrics is not None:
        _metrics.enrichment_seconds.observe(duration_ms / 1000)


def enrichment_finished(status: str, reason: str | None, *, duplicate: bool) -> None:
    """A task wrote its enrichment (or found it written by an earlier delivery)."""
    if _metrics is None:
        return
    if duplicate:
        _metrics.enrichments_duplicate.inc()
    elif status == "enriched":
        _metrics.enrichments_done.inc()
    else:
        _metrics.enrichments_failed.labels(reason or "unknown").inc()


def enrichment_retried(reason: str) -> None:
    if _metrics is not None:
        _metrics.enrichments_retried.labels(reason).inc()


@contextmanager
def model_load_timer() -> Iterator[None]:
    """Times a pool process's model load and counts the process as loaded afterwards."""
    started = time.perf_counter()
    yield
    if _metrics is not None:
        _metrics.model_load_seconds.observe(time.perf_counter() - started)
        _metrics.models_loaded.set(1)


def gpu_memory() -> None:
    """CUDA memory of this process, on each device; nothing where CUDA was never used."""
    import torch

    if _metrics is None or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        gauge = _metrics.gpu_memory_bytes
        gauge.labels(device, "allocated").set(torch.cuda.memory_allocated(index))
        gauge.labels(device, "reserved").set(torch.cuda.memory_reserved(index))
        gauge.labels(device, "peak").set(torch.cuda.max_memory_allocated(index))


def process_exited(pid: int) -> None:
    """Drop a finished pool process's live gauges (models loaded, GPU memory)."""
    if _folder is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(_folder))  # type: ignore[no-untyped-call]


def close() -> None:
    """The worker has stopped: remove the metric files' folder where `prepare` made it."""
    if _folder is not None and _made_folder:
        shutil.rmtree(_folder, ignore_errors=True)
