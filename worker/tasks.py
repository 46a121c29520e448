"""Celery tasks. A task validates, binds its context and hands the work to the stages."""

from __future__ import annotations

import random
import threading
import time
from typing import Any, TypeVar

import structlog
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from pydantic import ValidationError

from handlers.base import ModelLoadError, StageError
from handlers.segmentation import resolve_device
from schemas.events import ProductCreated, ProductDeleted
from schemas.settings import RETRY_COUNTDOWN_MAX_S, get_settings
from worker import batching, metrics
from worker.app import app
from worker.enrichment import Enrichment, Resources, commit, enrich, failed
from worker.errors import DeadLetterKind, InvalidEvent, TransientFault, UnreadableImage
from worker.events import dead_letter
from worker.models import get_models
from worker.stores import database, deletion, objects
from worker.stores.fetch import ImageFetcher

log = structlog.get_logger(__name__)

MAX_RETRIES = 6
MAX_STARTS = MAX_RETRIES + 3
"""Retries plus redeliveries after a lost worker; past this the event is dead-lettered."""
_lock = threading.Lock()
_resources: Resources | None = None
_deletion_s3: objects.S3Client | None = None


def process_resources() -> Resources:
    """This process's models and clients, made on first use, after any fork."""
    global _resources
    with _lock:
        if _resources is None:
            settings = get_settings()
            client = objects.make_client(settings.s3)
            objects.ensure_bucket(client, settings.s3.mask_bucket)
            with metrics.model_load_timer():
                models = get_models(settings.models)
            # One copy of the weights per process; the batchers share it among task threads.
            batched, _ = batching.batched_models(
                models, settings.batch, device=resolve_device(settings.models.device)
            )
            resources = Resources(
                settings=settings,
                models=batched,
                s3_client=client,
                fetcher=ImageFetcher(client, settings.s3, settings.images),
            )

            # Kept only once the indexes exist: a database down now is tried again by the
            # next task, the models already loaded.
            embedder, image_embedder = batched.embedder, batched.image_embedder
            with resources.database() as conn:
                database.ensure_embedding_index(conn, embedder.model_version, embedder.dimension)
                database.ensure_embedding_index(
                    conn, image_embedder.model_version, image_embedder.dimension
                )
            _resources = resources
        return _resources


def backoff_s(retries: int) -> float:
    """Exponential backoff with equal jitter: 2, 4, 8 ... s capped at 300 s, each between
    half and all of that, so that six retries span at least a minute of outage."""
    ceiling = min(RETRY_COUNTDOWN_MAX_S, 2.0 ** (retries + 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


ProductEvent = TypeVar("ProductEvent", ProductCreated, ProductDeleted)


def _start(contract: type[ProductEvent], event: dict[str, Any], task_id: str) -> ProductEvent:
    """Validate a task's event and bind its ids to every log line the task writes."""
    try:
        product_event = contract.model_validate(event)
    except ValidationError as exc:
        raise InvalidEvent("event", event, str(exc)) from exc

    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        event_id=str(product_event.event_id),
        product_id=product_event.product_id,
        task_id=task_id,
    )
    return product_event


@app.task(bind=True, name="enrichment.enrich_product", max_retries=MAX_RETRIES)
def enrich_product(self: Task, event: dict[str, Any]) -> str:
    started = time.perf_counter()
    product = _start(ProductCreated, event, self.request.id)
    metrics.event_started(product.occurred_at, attempt=self.request.retries)
    try:
        resources = process_resources()
    except ModelLoadError as exc:
        raise Reject(f"models cannot load: {exc}", requeue=True) from exc

    try:
        with batching.time_limit(resources.settings.batch.task_time_limit_s):
            with resources.database() as conn:
                starts = database.count_attempt(conn, product.event_id)
                deletion.admit_created(conn, product)
            if starts > MAX_STARTS:
                return _abandon(product, resources, f"started {starts} times without finishing")
            enrichment = _outcome(product, resources)
            with app.producer_or_acquire() as producer:
                written = _commit_unless_deleted(enrichment, resources, producer)
    except deletion.ProductIsDeleted as exc:
        log.info("enrichment_skipped", reason=str(exc), outcome="skipped")
        return "skipped"
    except TransientFault as exc:
        if self.request.retries >= MAX_RETRIES:
            return _abandon(
                product, resources, f"{exc} (still failing after {MAX_RETRIES} retries)"
            )
        log.warning("enrichment_retried", reason=str(exc), attempt=self.request.retries + 1)
        metrics.enrichment_retried(exc.kind)
        raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    completed = enrichment.completed
    metrics.enrichment_finished(completed.status, enrichment.rows.error_kind, duplicate=not written)
    log.info(
        "enrichment_finished",
        status=str(completed.status),
        reason=completed.reason,
        images=len(completed.images),
        masks=sum(len(image.masks) for image in completed.images),
        duplicate=not written,
        reused=completed.reused_from is not None,
        duration_ms=completed.timings_ms.get("total"),
        task_ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return str(completed.status)


def _commit_unless_deleted(enrichment: Enrichment, resources: Resources, producer: Any) -> bool:
    """commit(), unless the product was deleted while it was enriched: then the masks this
    enrichment wrote go too, and ProductIsDeleted propagates."""
    try:
        with deletion.refused_when_deleted(enrichment.rows.product.product_id):
            return commit(enrichment, resources, producer)
    except deletion.ProductIsDeleted:
        uris = [mask.uri for image in enrichment.completed.images for mask in image.masks]
        deletion.delete_mask_uris(resources.s3_client, uris)
        raise


def _outcome(product: ProductCreated, resources: Resources) -> Enrichment:
    """The one place where an exception decides what becomes of a product.

    TransientFault propagates (the task retries). Bad images and stage failures become a
    failed enrichment; a bad image also dead-letters the event with its reason.
    """
    models = resources.models
    try:
        return enrich(product, resources)
    except UnreadableImage as exc:
        _dead_letter(product, kind=exc.kind, reason=str(exc))
        log.warning("image_rejected", url=exc.url, reason=exc.reason, outcome="failed")
        return failed(product, models, reason=str(exc), kind=exc.kind, stage="fetch")
    except StageError as exc:
        log.error("stage_failed", stage=str(exc.stage), reason=exc.reason)
        return failed(product, models, reason=str(exc), kind="stage_failed", stage=exc.stage)
    except TransientFault:
        raise
    except SoftTimeLimitExceeded:
        raise  # batching.time_limit makes it a retry
    except Exception as exc:
        log.exception("enrichment_crashed")
        _dead_letter(product, kind=DeadLetterKind.UNEXPECTED, reason=repr(exc))
        return failed(product, models, reason=repr(exc)[:500], kind="unexpected", stage=None)


def _abandon(product: ProductCreated, resources: Resources, reason: str) -> str:
    """Give up on an event: park it with the reason and, where the database answers, record
    a failed enrichment. Nothing loops forever and nothing is dropped."""
    _dead_letter(product, kind=DeadLetterKind.ABANDONED, reason=reason)
    log.error("enrichment_abandoned", reason=reason, outcome="dead_lettered")
    metrics.enrichment_finished("failed", "abandoned", duplicate=False)
    try:
        with app.producer_or_acquire() as producer:
            commit(
                failed(product, resources.models, reason=reason, kind="abandoned", stage=None),
                resources,
                producer,
            )
    except TransientFault as exc:
        log.warning("failure_not_recorded", reason=str(exc))
    return "abandoned"


def _dead_letter(product: ProductCreated, *, kind: DeadLetterKind, reason: str) -> None:
    _park(
        product.model_dump_json().encode(),
        kind=kind,
        reason=reason,
        routing_key=str(product.event_type),
    )


def _park(body: bytes, *, kind: DeadLetterKind, reason: str, routing_key: str) -> None:
    """Put a message body in the dead-letter queue with its kind and reason."""
    with app.producer_or_acquire() as producer:
        dead_letter(
            producer, get_settings(), body, kind=kind, reason=reason, routing_key=routing_key
        )


@app.task(bind=True, name="enrichment.delete_product", max_retries=MAX_RETRIES)
def delete_product(self: Task, event: dict[str, Any]) -> str:
    """Delete a product's rows and masks and keep its tombstone (worker/stores/deletion.py).

    Safe to run twice: a redelivered event, or one for an unknown product, deletes nothing
    and leaves the tombstone. It loads no model.
    """
    deleted = _start(ProductDeleted, event, self.request.id)

    settings = get_settings()
    try:
        done = deletion.delete_product(
            deleted,
            database_url=settings.database_url.get_secret_value(),
            client=_deletion_client(),
            bucket=settings.s3.mask_bucket,
        )
    except TransientFault as exc:
        if self.request.retries >= MAX_RETRIES:
            reason = f"{exc} (still failing after {MAX_RETRIES} retries)"
            _park(
                deleted.model_dump_json().encode(),
                kind=DeadLetterKind.ABANDONED,
                reason=reason,
                routing_key=str(deleted.event_type),
            )
            log.error("deletion_abandoned", reason=reason, outcome="dead_lettered")
            return "abandoned"
        log.warning("deletion_retried", reason=str(exc), attempt=self.request.retries + 1)
        raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    log.info("product_deleted", masks=done.masks, rows=done.rows)
    return "deleted"


def _deletion_client() -> objects.S3Client:
    """The process's S3 client; deletions do not wait for the models to load."""
    global _deletion_s3
    with _lock:
        if _resources is not None:
            return _resources.s3_client
        if _deletion_s3 is None:
            settings = get_settings()
            _deletion_s3 = objects.make_client(settings.s3)
            objects.ensure_bucket(_deletion_s3, settings.s3.mask_bucket)
        return _deletion_s3


@app.task(bind=True, name="enrichment.start_backfill", max_retries=MAX_RETRIES)
def start_backfill(self: Task, request: dict[str, Any], skip: int = 0) -> dict[str, Any]:
    """Submit a backfill (schemas.backfill.BackfillRequest) for another service.

    Each task submits for `ENRICH_BACKFILL_SLICE_S`, then hands the rest to a new task that
    starts `skip` records into the source. The run id defaults to one made of the task id, so
    that a redelivered task resumes its own run.
    """
    import json

    from schemas.backfill import BackfillRequest
    from worker.backfill import InvalidBackfill, run_backfill

    settings = get_settings()
    try:
        parsed = BackfillRequest.model_validate(request)
        parsed = parsed.model_copy(update={"run_id": parsed.run_id or f"bf-{self.request.id}"})
        outcome = run_backfill(
            parsed, settings, deadline=time.monotonic() + settings.backfill_slice_s, skip=skip
        )
    except (ValidationError, InvalidBackfill) as exc:
        reason = str(exc)
        _park(
            json.dumps(_without_secrets(request), default=str).encode(),
            kind=InvalidBackfill.kind,
            reason=reason,
            routing_key="enrichment.start_backfill",
        )
        log.warning("backfill_rejected", reason=reason[:500], outcome="dead_lettered")
        return {"status": "rejected", "reason": reason}
    except TransientFault as exc:
        log.warning("backfill_retried", reason=str(exc), attempt=self.request.retries + 1)
        raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    if not outcome.finished:
        start_backfill.apply_async(
            kwargs={"request": {**request, "run_id": outcome.run_id}, "skip": outcome.position}
        )
    return {
        "status": "finished" if outcome.finished else "continued",
        "run_id": outcome.run_id,
        **outcome.counts.as_dict(),
    }


def _without_secrets(request: dict[str, Any]) -> dict[str, Any]:
    """The request as parked: a catalog URL carries a password and stays out."""
    source = request.get("source")
    if isinstance(source, dict) and "catalog_url" in source:
        return {**request, "source": {**source, "catalog_url": "(left out)"}}
    return request


@app.task(bind=True, name="enrichment.expand_backfill_chunk", max_retries=MAX_RETRIES)
def expand_backfill_chunk(
    self: Task, run_id: str, events: list[dict[str, Any]], rate: float | None = None
) -> dict[str, Any]:
    """Publish one enrichment.enrich_product task per product of a backfill chunk message
    (schemas.backfill.BackfillChunk), then acknowledge the chunk.

    A redelivered chunk publishes nothing again for the products already expanded. With a
    rate, one slice is expanded and the rest is sent on with the countdown that slice takes.
    """
    import json

    from schemas.backfill import BackfillChunk
    from worker.backfill import InvalidBackfill, expand_chunk

    settings = get_settings()
    try:
        chunk = BackfillChunk.model_validate({"run_id": run_id, "events": events, "rate": rate})
    except ValidationError as exc:
        reason = f"the chunk message is no backfill chunk: {exc}"
        _park(
            json.dumps({"run_id": run_id, "events": events, "rate": rate}).encode(),
            kind=InvalidBackfill.kind,
            reason=reason,
            routing_key="enrichment.expand_backfill_chunk",
        )
        log.warning("backfill_chunk_rejected", reason=reason[:500], outcome="dead_lettered")
        return {"status": "rejected", "reason": reason}

    try:
        expansion = expand_chunk(chunk, settings)
    except TransientFault as exc:
        if self.request.retries >= MAX_RETRIES:
            reason = f"{exc} (still failing after {MAX_RETRIES} retries)"
            _park(
                json.dumps(chunk.model_dump()).encode(),
                kind=DeadLetterKind.ABANDONED_BACKFILL_CHUNK,
                reason=reason,
                routing_key="enrichment.expand_backfill_chunk",
            )
            log.error("backfill_chunk_abandoned", reason=reason, outcome="dead_lettered")
            return {"status": "abandoned", "reason": reason}
        log.warning("backfill_chunk_retried", reason=str(exc), attempt=self.request.retries + 1)
        raise self.retry(exc=exc, countdown=backoff_s(self.request.retries)) from exc

    if expansion.rest:
        expand_backfill_chunk.apply_async(
            kwargs={"run_id": run_id, "events": expansion.rest, "rate": rate},
            countdown=expansion.countdown_s,
            queue=settings.backfill_queue,
        )
    return {
        "status": "expanded",
        "published": expansion.published,
        "already_expanded": expansion.already_expanded,
        "rest": len(expansion.rest),
        "countdown_s": expansion.countdown_s,
    }
