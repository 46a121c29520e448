"""`enrich bench`: the model stages alone and the whole worker, on real product photos.

One run measures, on the same photos (clothing-small's validation split):

- each stage alone, in this process: images or texts per second at batch size 1 and at the
  configured batch size (`ENRICH_BATCH__MAX_SIZE`), with the precision the worker uses, the
  best of three passes after an untimed one;
- the whole worker: `enrich worker --pool threads` on a local stack (embedded Postgres, a
  SeaweedFS S3 server, the RabbitMQ at `ENRICH_BROKER_URL`), events per second from the
  publication of N events to the last completion event, after a warm-up batch;
- `end_to_end_ratio`: the worker's events per second over what the stages alone manage per
  event (one photo and one text each), one after the other;
- per event, the task's time outside the model stages (fetch and decode, masks to S3, rows,
  outbox and publishing): task time less the stage times, which include batch waits;
- the peak resident memory of the worker's processes, models loaded (`VmHWM`).

The stages run before the worker starts, so that the two never compete for the machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from kombu import Connection

from handlers.base import Stage
from schemas.events import EventType, ProductCreated, ProductImage
from schemas.settings import Settings
from worker.bench_stages import BenchProduct, bench_products, run_stages_bench
from worker.events import publish_events
from worker.local import CompletionListener, LocalStack, local_stack, worker_process
from worker.stores import objects

log = structlog.get_logger(__name__)

IMAGE_BUCKET = "bench-images"


@dataclass(frozen=True)
class BenchConfig:
    datasets: Path
    events: int = 200
    photos: int = 32
    """Photos the stages are timed on; the events cycle through the same ones."""
    concurrency: int | None = None
    """Task threads of the worker; unset means twice the batch size."""
    warmup_events: int | None = None
    """Events enriched before the clock starts; unset means one batch."""


def run_bench(settings: Settings, config: BenchConfig) -> dict[str, Any]:
    """Every figure of one run, as one JSON-ready document: `enrich bench stages`'s, then the
    whole worker's on the same photos."""
    if config.events < 1 or config.photos < 1:
        raise ValueError(f"events and photos must be at least 1, got {config}")
    concurrency = config.concurrency or 2 * settings.batch.max_size
    products = bench_products(config.datasets, config.photos)

    result = run_stages_bench(settings, products)
    worker = measure_worker(settings, products, config, concurrency)

    result["settings"] |= {
        "batch_max_wait_ms": settings.batch.max_wait_ms,
        "pool": "threads",
        "concurrency": concurrency,
    }
    result["end_to_end"] = worker
    result["end_to_end_ratio"] = round(
        worker["events_per_s"] / result["stages_alone_events_per_s"], 3
    )
    return result


def measure_worker(
    settings: Settings, products: Sequence[BenchProduct], config: BenchConfig, concurrency: int
) -> dict[str, Any]:
    """The whole worker on `config.events` events, after a warm-up."""
    warmup = config.warmup_events or settings.batch.max_size
    with tempfile.TemporaryDirectory(prefix="enrich-bench-") as tmp:
        root = Path(tmp)
        with local_stack(root / "stack", base=settings) as stack:
            events = _upload_events(stack, products, warmup + config.events)
            timed, log_file = events[warmup:], root / "worker.log"
            with (
                CompletionListener(stack.settings) as listener,
                worker_process(stack, log_file, pool="threads", concurrency=concurrency) as worker,
            ):
                _publish(stack, events[:warmup])
                _wait(listener, worker, warmup, timeout_s=900 + 30 * warmup)

                started = time.monotonic()
                _publish(stack, timed)
                _wait(listener, worker, warmup + len(timed), timeout_s=600 + 30 * len(timed))
                elapsed = time.monotonic() - started
                peak_rss = peak_rss_bytes(worker.pid)

            completions = [c for c in listener.received if c["causation_id"] in _ids(timed)]
            task_ms = _task_ms(log_file)

    enriched = sum(1 for c in completions if c["status"] == "enriched")
    return {
        "events": len(timed),
        "completed": len(completions),
        "enriched": enriched,
        "warmup_events": warmup,
        "seconds": round(elapsed, 2),
        "events_per_s": round(len(completions) / elapsed, 4),
        "outside_models_ms": outside_models_ms(completions, task_ms),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
    }


def outside_models_ms(
    completions: Sequence[dict[str, Any]], task_ms: dict[str, float]
) -> dict[str, float | int]:
    """Median and p95 over events of the task time spent outside the model stages.

    The stage timings (`timings_ms` of each completion event) include the wait for a batch,
    so what is left is fetch and decode, masks to S3, the rows, the outbox and publishing.
    The intake step, in the worker's main process, runs before the task and is not in it.
    """
    stages = {str(stage) for stage in Stage}
    outside = [
        task_ms[c["causation_id"]] - sum(v for k, v in c["timings_ms"].items() if k in stages)
        for c in completions
        if c["causation_id"] in task_ms and c["status"] == "enriched"
    ]
    if not outside:
        return {"events": 0, "median": 0.0, "p95": 0.0}
    ordered = sorted(outside)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "events": len(outside),
        "median": round(statistics.median(outside), 1),
        "p95": round(p95, 1),
    }


def peak_rss_bytes(pid: int) -> int:
    """Peak resident memory (VmHWM) of `pid` and its children, summed (Linux /proc)."""
    total = 0
    for process in [pid, *children_of(pid)]:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def print_bench(settings: Settings, config: BenchConfig, *, as_json: bool) -> int:
    result = run_bench(settings, config)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for stage, figures in result["stages"].items():
            print(
                f"{stage:<14} {figures['batch_1_per_s']:>8.2f} {figures['unit']}/s at batch 1,"
                f" {figures['batched_per_s']:>8.2f} at {figures['batch_size']}"
                f" (x{figures['ratio']:.2f})"
            )
        worker = result["end_to_end"]
        print(
            f"worker         {worker['events_per_s']:>8.3f} events/s over {worker['events']}"
            f" events; stages alone {result['stages_alone_events_per_s']:.3f};"
            f" ratio {result['end_to_end_ratio']:.2f}"
        )
        outside = worker["outside_models_ms"]
        print(
            f"outside models {outside['median']:.0f} ms median, {outside['p95']:.0f} ms p95;"
            f" peak RSS {worker['peak_rss_mb']:.0f} MiB"
        )
    return 0 if result["end_to_end"]["completed"] == config.events else 1


def _upload_events(
    stack: LocalStack, products: Sequence[BenchProduct], count: int
) -> list[ProductCreated]:
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, IMAGE_BUCKET)
    keys = []
    for product in products:
        key = f"bench/{uuid.uuid4().hex}.jpg"
        client.put_object(Bucket=IMAGE_BUCKET, Key=key, Body=product.photo.read_bytes())
        keys.append(key)

    events = []
    for index in range(count):
        product = products[index % len(products)]
        events.append(
            ProductCreated(
                event_id=uuid.uuid4(),
                event_type=EventType.PRODUCT_CREATED,
                schema_version=1,
                occurred_at=datetime.now(UTC),
                product_id=f"bench-{index:05d}",
                title=product.title,
                description=product.description,
                attributes=product.attributes,
                images=[ProductImage(url=f"s3://{IMAGE_BUCKET}/{keys[index % len(products)]}")],
            )
        )
    return events


def _publish(stack: LocalStack, events: Sequence[ProductCreated]) -> None:
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        publish_events(connection, stack.settings, [event.model_dump_json() for event in events])


def _wait(listener: CompletionListener, worker: Any, count: int, *, timeout_s: float) -> None:
    received = listener.wait_until(
        lambda got: len(got) >= count or worker.poll() is not None, timeout_s=timeout_s
    )
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited with code {worker.returncode} during the bench")
    if len(received) < count:
        raise RuntimeError(f"{len(received)} of {count} completion events in {timeout_s:g} s")


def _ids(events: Sequence[ProductCreated]) -> set[str]:
    return {str(event.event_id) for event in events}


def _task_ms(log_file: Path) -> dict[str, float]:
    """Each event's task time, from the worker's `enrichment_finished` log lines."""
    found = {}
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "enrichment_finished" and "task_ms" in entry:
            found[str(entry["event_id"])] = float(entry["task_ms"])
    return found


def children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (a prefork worker's pool processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
