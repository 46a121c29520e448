"""A local stack for the demo and the tests: servers, a worker process, a completion listener.

Everything it starts listens on 127.0.0.1. The exchange and the queues carry a run id, so
that runs on one broker never see each other's messages; they are deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer, Message, Queue
from kombu.utils.url import maybe_sanitize_url
from pydantic import SecretStr

from schemas.events import EventType
from schemas.settings import S3Settings, Settings
from worker.events import catalog_exchange
from worker.servers import EmbeddedPostgres, SeaweedS3, broker_reachable

LOCAL_S3_KEY = "local"
"""The local S3 server accepts any key; real credentials come from the environment."""


class BrokerUnreachable(RuntimeError):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"no RabbitMQ answers at {maybe_sanitize_url(url)}. Start one (Debian: "
            "`apt-get install rabbitmq-server` then `rabbitmq-server -detached`) or point "
            "ENRICH_BROKER_URL at yours."
        )


@dataclass(frozen=True)
class LocalStack:
    settings: Settings
    postgres: EmbeddedPostgres
    s3: SeaweedS3
    run_id: str

    def environment(self) -> dict[str, str]:
        """Variables that point a worker process at this stack."""
        s = self.settings
        return {
            "ENRICH_BROKER_URL": s.broker_url.get_secret_value(),
            "ENRICH_DATABASE_URL": s.database_url.get_secret_value(),
            "ENRICH_S3__ENDPOINT_URL": self.s3.endpoint_url,
            "ENRICH_S3__MASK_BUCKET": s.s3.mask_bucket,
            "ENRICH_EXCHANGE": s.exchange,
            "ENRICH_INTAKE_QUEUE": s.intake_queue,
            "ENRICH_TASK_QUEUE": s.task_queue,
            "ENRICH_DEAD_LETTER_QUEUE": s.dead_letter_queue,
            "ENRICH_BACKFILL_QUEUE": s.backfill_queue,
            "AWS_ACCESS_KEY_ID": LOCAL_S3_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_S3_KEY,
            "HF_HUB_OFFLINE": "1",
        }


@contextmanager
def local_stack(root: Path, *, base: Settings | None = None) -> Iterator[LocalStack]:
    """Start Postgres and S3 under `root`, migrate, and yield settings that point at them."""
    base = base or Settings()
    broker = base.broker_url.get_secret_value()
    if not broker_reachable(broker):
        raise BrokerUnreachable(broker)

    # Each run keeps its servers' files in a folder of its own, so that a second run (a demo
    # while another keeps its servers) never removes the first one's data.
    run_id = uuid.uuid4().hex[:8]
    root = root / run_id
    root.mkdir(parents=True)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", LOCAL_S3_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", LOCAL_S3_KEY)

    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)  # last, once the servers stop
        postgres = stack.enter_context(EmbeddedPostgres(root / "postgres"))
        s3 = stack.enter_context(SeaweedS3(root / "s3"))
        settings = base.model_copy(
            update={
                "database_url": SecretStr(postgres.url),
                "s3": S3Settings(endpoint_url=s3.endpoint_url, mask_bucket=base.s3.mask_bucket),
                "exchange": f"{base.exchange}.{run_id}",
                "intake_queue": f"{base.intake_queue}.{run_id}",
                "task_queue": f"{base.task_queue}.{run_id}",
                "dead_letter_queue": f"{base.dead_letter_queue}.{run_id}",
                "backfill_queue": f"{base.backfill_queue}.{run_id}",
            }
        )
        from worker.stores.database import migrate

        migrate(postgres.url)
        local = LocalStack(settings=settings, postgres=postgres, s3=s3, run_id=run_id)
        try:
            yield local
        finally:
            delete_queues(local.settings)
            delete_exchanges(local.settings)


def delete_queues(settings: Settings) -> None:
    """Delete a run's queues; each is durable and would outlive the run."""
    with Connection(settings.broker_url.get_secret_value()) as conn:
        channel = conn.channel()
        for name in (
            settings.intake_queue,
            settings.task_queue,
            settings.dead_letter_queue,
            settings.backfill_queue,
        ):
            try:
                channel.queue_delete(name)
            except Exception:
                channel = conn.channel()


def delete_exchanges(settings: Settings) -> None:
    with Connection(settings.broker_url.get_secret_value()) as conn:
        channel = conn.channel()
        for name in (settings.exchange, settings.task_queue, settings.backfill_queue):
            try:
                channel.exchange_delete(name)
            except Exception:
                channel = conn.channel()


@contextmanager
def worker_process(
    stack: LocalStack, log_file: Path, *, pool: str = "prefork", concurrency: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    """`enrich worker` in a child process, stopped with SIGTERM (a warm shutdown)."""
    # No metrics port unless the caller's environment names one: several local workers
    # must not fight over the default port.
    env = {"ENRICH_METRICS_PORT": "0", **os.environ, **stack.environment()}
    env["ENRICH_LOG_JSON"] = "true"
    command = [
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
    ]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class CompletionListener:
    """Collects enrichment-complete events from the exchange, as a downstream service would."""

    def __init__(self, settings: Settings) -> None:
        self.connection = Connection(settings.broker_url.get_secret_value())
        exchange = catalog_exchange(settings)
        self.queue = Queue(
            f"completions.{uuid.uuid4().hex[:8]}",
            exchange,
            bindings=None,
            routing_key=str(EventType.PRODUCT_ENRICHED),
            exclusive=True,
            auto_delete=True,
        )
        self.received: list[dict[str, Any]] = []
        channel = self.connection.channel()
        bound = self.queue(channel)
        exchange(channel).declare()
        bound.declare()
        bound.bind_to(exchange, routing_key=str(EventType.PRODUCT_ENRICHMENT_FAILED))
        self.consumer = Consumer(channel, queues=[bound], on_message=self._on_message)
        self.consumer.consume()

    def _on_message(self, message: Message) -> None:
        self.received.append(json.loads(message.body))
        message.ack()

    def wait_for(self, count: int, *, timeout_s: float) -> list[dict[str, Any]]:
        """Block until `count` events arrived or the time is up; returns what arrived."""
        return self.wait_until(lambda received: len(received) >= count, timeout_s=timeout_s)

    def wait_until(
        self, done: Callable[[list[dict[str, Any]]], bool], *, timeout_s: float
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while not done(self.received) and time.monotonic() < deadline:
            try:
                self.connection.drain_events(timeout=1)
            except TimeoutError:
                continue
        return list(self.received)

    def close(self) -> None:
        self.connection.release()

    def __enter__(self) -> CompletionListener:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
