"""A worker's health, served with its metrics by the worker's main process.

- `/metrics`: every process's metrics (`worker.metrics`), and the messages ready in the
  worker's queues, asked of the broker at each scrape.
- `/healthz/ready`: 200 once a pool process has loaded its models and the broker and the
  database answer; 503 naming the failed checks otherwise.
- `/healthz/live`: 503 when a consumer has messages ready in its queues (the intake's; the
  task and backfill queues for the task consumer) but has made no progress for
  `liveness_stall_s`: the worker is still connected but no longer consuming.
  Anything else is live, a broker that does not answer included: a restart would not help.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from celery import bootsteps
from kombu import Connection

from schemas.settings import Settings, get_settings
from worker import metrics
from worker.metrics import Consumer

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

log = structlog.get_logger(__name__)

READY_MESSAGES = "enrich_queue_messages_ready"
HEARTBEAT = "enrich_consumer_heartbeat_timestamp_seconds"
MODELS_LOADED = "enrich_models_loaded"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> bytes:
        body = {
            "status": "ok" if self.ok else "failing",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }
        return json.dumps(body).encode() + b"\n"


class BrokerUnanswered(Exception):
    """A queue's length could not be had from the broker."""


class QueueProbe:
    """Ready messages per queue, by a passive declare on a connection of its own.

    One connection is kept and shared by the server's threads under a lock; a broken one is
    dropped and made again on the next call.
    """

    def __init__(self, broker_url: str, *, timeout_s: float) -> None:
        self.broker_url = broker_url
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    def ready_messages(self, queues: Iterable[str]) -> dict[str, int]:
        """Raises BrokerUnanswered when the broker does not answer or lacks a queue."""
        with self._lock:
            try:
                return {name: self._declare(name) for name in queues}
            except Exception as exc:
                self._drop()
                raise BrokerUnanswered(str(exc)[:200] or type(exc).__name__) from exc

    def _declare(self, name: str) -> int:
        if self._connection is None:
            self._connection = Connection(self.broker_url, connect_timeout=self.timeout_s)
            self._connection.ensure_connection(max_retries=1, timeout=self.timeout_s)
        channel = self._connection.default_channel
        _, message_count, _ = channel.queue_declare(queue=name, passive=True)
        return int(message_count)

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def stalled_consumers(
    *,
    ready: Mapping[str, int],
    heartbeats: Mapping[str, float],
    now: float,
    stall_s: float,
) -> list[str]:
    """Consumers with messages ready in their queue and no progress for `stall_s` seconds.

    `ready` and `heartbeats` are keyed by consumer; a consumer without a heartbeat counts as
    stalled since the epoch, so the caller seeds every heartbeat when the worker starts.
    """
    return sorted(
        consumer
        for consumer, count in ready.items()
        if count > 0 and now - heartbeats.get(consumer, 0.0) > stall_s
    )


def merged_samples(folder: Path, name: str) -> list[Sample]:
    """The samples called `name` in every process's metric files, merged as /metrics does."""
    from prometheus_client.multiprocess import MultiProcessCollector

    collector = MultiProcessCollector(None, path=str(folder))  # type: ignore[no-untyped-call]
    families = collector.collect()  # type: ignore[no-untyped-call]
    return [sample for family in families for sample in family.samples if sample.name == name]


def database_check(database_url: str, *, timeout_s: float) -> Check:
    try:
        with psycopg.connect(database_url, connect_timeout=math.ceil(timeout_s)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return Check("database", False, f"unreachable: {str(exc).strip()[:200]}")
    return Check("database", True, "answers")


@dataclass
class Health:
    """The checks of one worker; `folder` holds its processes' metric files."""

    settings: Settings
    folder: Path
    probe: QueueProbe
    started_at: float = field(default_factory=time.time)
    stopping: threading.Event = field(default_factory=threading.Event)
    _was_ready: bool | None = field(default=None, init=False)

    @classmethod
    def from_settings(cls, settings: Settings, folder: Path) -> Health:
        probe = QueueProbe(
            settings.broker_url.get_secret_value(), timeout_s=settings.health_timeout_s
        )
        return cls(settings=settings, folder=folder, probe=probe)

    @property
    def queues(self) -> dict[str, tuple[str, ...]]:
        """Each consumer's queues: the task consumer takes uploads and backfill work alike."""
        return {
            Consumer.INTAKE: (self.settings.intake_queue,),
            Consumer.TASKS: (self.settings.task_queue, self.settings.backfill_queue),
        }

    @property
    def queue_names(self) -> list[str]:
        return [name for names in self.queues.values() for name in names]

    def readiness(self) -> Report:
        loaded = int(sum(sample.value for sample in merged_samples(self.folder, MODELS_LOADED)))
        models = Check("models", loaded > 0, f"{loaded} pool processes have loaded their models")
        stopping = self.stopping.is_set()
        running = Check("running", not stopping, "shutting down" if stopping else "running")
        report = Report([running, models, self._broker_check(), self._database_check()])
        self._log_change(report)
        return report

    def liveness(self) -> Report:
        if self.stopping.is_set():
            return Report([Check("consumers", True, "the worker is shutting down")])
        try:
            ready = self._ready_by_consumer()
        except BrokerUnanswered as exc:
            return Report([Check("consumers", True, f"not judged, broker unreachable: {exc}")])

        heartbeats = self._heartbeats()
        stall_s = self.settings.liveness_stall_s
        stalled = stalled_consumers(
            ready=ready, heartbeats=heartbeats, now=time.time(), stall_s=stall_s
        )
        if stalled:
            log.warning("worker_not_live", stalled=stalled, ready=ready, stall_s=stall_s)
        detail = f"stalled for over {stall_s:g} s with messages ready" if stalled else "moving"
        checks = [Check(f"consumer_{c}", c not in stalled, detail) for c in ready]
        return Report(checks)

    def metrics_text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.folder))  # type: ignore[no-untyped-call]
        registry.register(_QueueCollector(self))
        return generate_latest(registry)

    def seed_heartbeats(self) -> None:
        """A worker that just started has made no progress yet, but is not stalled either."""
        for consumer in self.queues:
            metrics.consumer_heartbeat(consumer)

    def _ready_by_consumer(self) -> dict[str, int]:
        counts = self.probe.ready_messages(self.queue_names)
        return {
            consumer: sum(counts[name] for name in names) for consumer, names in self.queues.items()
        }

    def _heartbeats(self) -> dict[str, float]:
        samples = merged_samples(self.folder, HEARTBEAT)
        return {sample.labels["consumer"]: sample.value for sample in samples}

    def _broker_check(self) -> Check:
        try:
            self.probe.ready_messages(self.queue_names)
        except BrokerUnanswered as exc:
            return Check("broker", False, f"unreachable: {exc}")
        return Check("broker", True, "answers")

    def _database_check(self) -> Check:
        url = self.settings.database_url.get_secret_value()
        return database_check(url, timeout_s=self.settings.health_timeout_s)

    def _log_change(self, report: Report) -> None:
        if report.ok == self._was_ready:
            return
        self._was_ready = report.ok
        failed = [check.name for check in report.checks if not check.ok]
        log.info("worker_readiness_changed", ready=report.ok, failed=failed)


class _QueueCollector:
    """`enrich_queue_messages_ready{queue}`, asked of the broker when scraped."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            READY_MESSAGES, "Messages ready in the worker's queues.", labels=["queue"]
        )
        try:
            counts = self.health.probe.ready_messages(self.health.queue_names)
        except BrokerUnanswered as exc:
            log.warning("queue_depth_unavailable", reason=str(exc))
            counts = {}
        for queue, count in counts.items():
            family.add_metric([queue], count)
        yield family


Route = Callable[[], tuple[int, str, bytes]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        status, content_type, body = route() if route else (404, "text/plain", b"not found\n")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Not logged: probes every few seconds would bury the worker's own events."""


class HealthServer:
    """`/metrics`, `/healthz/ready` and `/healthz/live` on a thread of the main process."""

    def __init__(self, health: Health, *, host: str, port: int) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        self.health = health
        self.httpd = _Server((host, port), _Handler)
        self.httpd.routes = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, health.metrics_text()),
            "/healthz/ready": lambda: _as_response(health.readiness()),
            "/healthz/live": lambda: _as_response(health.liveness()),
        }
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="health-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.health.seed_heartbeats()
        self._thread.start()
        log.info("health_server_started", port=self.port, metrics_dir=str(self.health.folder))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.health.probe.close()


def _as_response(report: Report) -> tuple[int, str, bytes]:
    return (200 if report.ok else 503), "application/json", report.to_json()


_server: HealthServer | None = None


class HealthStep(bootsteps.StartStopStep):
    """Prepares the metrics before the pool forks and serves them once the worker starts.

    The server keeps answering while a warm shutdown drains the pool; `shutdown` closes it
    when the worker has stopped (the `worker_shutdown` signal).
    """

    label = "Health"

    def create(self, worker: Any) -> HealthServer | None:
        global _server
        settings = get_settings()
        folder = metrics.prepare(settings.metrics_dir)
        if settings.metrics_port == 0:
            return None
        try:
            _server = HealthServer(
                Health.from_settings(settings, folder),
                host=settings.metrics_host,
                port=settings.metrics_port,
            )
        except OSError as exc:
            log.error("health_server_failed", port=settings.metrics_port, reason=str(exc))
        return _server

    def stop(self, worker: Any) -> None:
        """Nothing yet: the probes go on answering until the pool has drained."""


def mark_stopping() -> None:
    """A shutdown began: not ready for new work, and not to be judged on progress."""
    if _server is not None:
        _server.health.stopping.set()


def shutdown() -> None:
    """Close the server, once the pool has drained."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None
