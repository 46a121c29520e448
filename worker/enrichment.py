"""One product's enrichment: fetch, decode, reuse an unchanged one, segment, tag and embed the
images, embed the text, write masks, write rows, publish. Celery-free, so that the same steps
serve the worker, the demo and the tests."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import structlog
from kombu import Producer
from kombu.exceptions import OperationalError as KombuOperationalError

from handlers.base import Segmentation, Stage, Tags
from handlers.embedding import product_text
from handlers.image_embedding import product_image_embedding
from schemas.events import (
    EmbeddingInfo,
    EnrichmentCompleted,
    EventType,
    ImageResult,
    LabelResult,
    MaskResult,
    ProductCreated,
    Status,
)
from schemas.settings import Settings
from worker import metrics
from worker.errors import TransientFault
from worker.models import Models
from worker.stores import database, objects, outbox
from worker.stores.fetch import ImageFetcher
from worker.stores.images import DecodedImage, decode_image

log = structlog.get_logger(__name__)


@dataclass
class Resources:
    """What a worker process holds: models, an S3 client, and a database connection per
    thread (a threads pool runs several tasks at once; a psycopg connection serves one)."""

    settings: Settings
    models: Models
    s3_client: objects.S3Client
    fetcher: ImageFetcher
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @contextmanager
    def database(self) -> Iterator[psycopg.Connection[Any]]:
        """This thread's connection; a broken one is dropped and the fault is transient."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        try:
            if conn is None or conn.closed:
                conn = database.connect(self.settings.database_url.get_secret_value())
                self._local.conn = conn
            yield conn
        except psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
            self._local.conn = None
            raise TransientFault(f"database unavailable: {exc}") from exc


@dataclass
class Enrichment:
    """A finished enrichment: its rows and its completion event."""

    rows: database.EnrichmentRows
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> EnrichmentCompleted:
        return self.rows.completed


def enrich(event: ProductCreated, resources: Resources) -> Enrichment:
    """Run every stage on one product and write its masks; rows are written by `commit`.

    When the product's latest enriched enrichment had the same inputs (text and image
    hashes) and model versions, no model runs: the enrichment reuses those results.
    """
    timings: dict[str, float] = {}
    models = resources.models
    started = time.perf_counter()

    with _timed(timings, "fetch"):
        images = [_fetch(url, resources) for url in (image.url for image in event.images)]
    text = product_text(event.title, event.description, event.attributes)
    inputs = input_sha256(text, [image.sha256 for image in images])

    with resources.database() as conn, conn.transaction():
        found = database.reusable_enrichment(conn, event.product_id, inputs, models.versions)
    if found is not None:
        return _reused(event, found, inputs, models, timings, started)

    pixels = [image.pixels for image in images]
    metrics.batch_started(len(pixels))
    with _timed(timings, Stage.SEGMENTATION):
        segmentations = models.segmenter.segment(pixels)
    # Tags and image embeddings come from one forward pass of the tagger.
    with _timed(timings, Stage.TAGGING):
        tags, image_embeddings = models.tagger.tag_and_embed(pixels)
    with _timed(timings, Stage.EMBEDDING):
        embedding = models.embedder.embed([text])[0]

    with _timed(timings, "masks"):
        results = [
            _image_result(image, segmentation, tag, event.product_id, resources)
            for image, segmentation, tag in zip(images, segmentations, tags, strict=True)
        ]
    timings["total"] = _ms_since(started)
    metrics.enrichment_timed(timings["total"])

    completed = _completed(event, models, results, timings)
    rows = database.EnrichmentRows(
        product=event,
        completed=completed,
        embedding=embedding,
        image_embeddings=image_embeddings,
        product_image_embedding=product_image_embedding(image_embeddings),
        input_sha256=inputs,
    )
    return Enrichment(rows=rows, timings_ms=timings)


def input_sha256(text: str, image_sha256s: list[str]) -> str:
    """The hash of what the models see: the embedded product text and the images in order."""
    digest = hashlib.sha256(b"enrichment-inputs/1\n")
    digest.update(text.encode())
    for image_sha256 in image_sha256s:
        digest.update(b"\n" + image_sha256.encode())
    return digest.hexdigest()


def _reused(
    event: ProductCreated,
    found: database.ReusableEnrichment,
    inputs: str,
    models: Models,
    timings: dict[str, float],
    started: float,
) -> Enrichment:
    """This event's enrichment as a reuse of `found`: no model ran, no mask was written."""
    timings["total"] = _ms_since(started)
    completed = _completed(event, models, [], timings)
    rows = database.EnrichmentRows(
        product=event, completed=completed, embedding=None, input_sha256=inputs
    )
    return Enrichment(rows=database.as_reuse(rows, found), timings_ms=timings)


def _completed(
    event: ProductCreated, models: Models, results: list[ImageResult], timings: dict[str, float]
) -> EnrichmentCompleted:
    return EnrichmentCompleted(
        event_type=EventType.PRODUCT_ENRICHED,
        causation_id=event.event_id,
        product_id=event.product_id,
        status=Status.ENRICHED,
        images=results,
        embedding=EmbeddingInfo(
            model_id=models.embedder.model_id, dimension=models.embedder.dimension
        ),
        image_embedding=EmbeddingInfo(
            model_id=models.image_embedder.model_id, dimension=models.image_embedder.dimension
        ),
        model_versions=models.versions,
        timings_ms=timings,
    )


def failed(
    event: ProductCreated, models: Models, *, reason: str, kind: str, stage: str | None
) -> Enrichment:
    """A failed enrichment: recorded with its reason, and announced like a finished one."""
    completed = EnrichmentCompleted(
        event_type=EventType.PRODUCT_ENRICHMENT_FAILED,
        causation_id=event.event_id,
        product_id=event.product_id,
        status=Status.FAILED,
        reason=reason,
        model_versions=models.versions,
    )
    rows = database.EnrichmentRows(
        product=event, completed=completed, embedding=None, error_stage=stage, error_kind=kind
    )
    return Enrichment(rows=rows)


def commit(enrichment: Enrichment, resources: Resources, producer: Producer) -> bool:
    """Write the rows and the completion event in one transaction, then relay the outbox.

    Returns False when the event had already been written (a redelivery): nothing is
    written twice, and a completion event a crash left in the outbox goes out now. When
    another event wrote the same results meanwhile, `enrichment` becomes a reuse of them.
    """
    with resources.database() as conn:
        with conn.transaction():
            written = database.write_enrichment(conn, enrichment.rows)
            if written is not None:
                outbox.add(conn, resources.settings.exchange, written.rows.completed)
        if written is not None:
            enrichment.rows = written.rows

        try:
            outbox.relay(conn, producer)
        except (KombuOperationalError, ConnectionError) as exc:
            raise TransientFault(f"broker unavailable: {exc}") from exc

    return written is not None


def _fetch(url: str, resources: Resources) -> DecodedImage:
    data = resources.fetcher.fetch(url)
    return decode_image(url, data, max_pixels=resources.settings.images.max_pixels)


def _image_result(
    image: DecodedImage,
    segmentation: Segmentation,
    tags: Tags,
    product_id: str,
    resources: Resources,
) -> ImageResult:
    version = resources.models.segmenter.model_version
    bucket = resources.settings.s3.mask_bucket
    masks = []
    for index in range(segmentation.num_masks):
        mask = _mask_at(segmentation, index, image)
        key = objects.mask_key(product_id, image.sha256, version, index)
        uri = objects.put_mask(resources.s3_client, bucket, key, objects.encode_mask_png(mask))
        # Rounded as the database's real columns give them back to a reused enrichment.
        box = tuple(round(float(v), 2) for v in segmentation.pred_boxes[index])
        masks.append(
            MaskResult(
                label=segmentation.pred_classes[index],
                score=round(float(segmentation.mask_scores[index]), 4),
                box=(box[0], box[1], box[2], box[3]),
                area=int(mask.sum()),
                uri=uri,
            )
        )

    labels = [LabelResult(label=label.label, score=round(label.score, 4)) for label in tags.labels]
    return ImageResult(
        url=image.url,
        image_sha256=image.sha256,
        width=image.width,
        height=image.height,
        masks=masks,
        labels=labels,
    )


def _mask_at(segmentation: Segmentation, index: int, image: DecodedImage) -> npt.NDArray[np.bool_]:
    """A detection-only model has no masks: its box, filled, stands in for one."""
    if segmentation.pred_masks is not None:
        mask: npt.NDArray[np.bool_] = segmentation.pred_masks[index]
        return mask
    x0, y0, x1, y1 = (int(v) for v in np.rint(segmentation.pred_boxes[index]))
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[str(name)] = _ms_since(started)
    metrics.stage_finished(str(name), timings[str(name)])
    log.debug("stage_finished", stage=str(name), duration_ms=timings[str(name)])


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
