"""Backfills: submit products that are already in the catalog for enrichment again.

A run reads product events from a source (a JSON lines file, a query on the catalog's
Postgres, JSON lines objects under an S3 prefix), keeps the products its mode selects
(`missing`, `stale`, `all`, decided against the enrichments table; deleted products never),
and publishes them in chunk messages (`enrichment.expand_backfill_chunk`, a few hundred
products each) onto the backfill queue, so that uploads, on the task queue, are never queued
behind it. A worker expands a chunk into one `enrichment.enrich_product` task per product on
the same queue (`expand_chunk`), at the run's rate if it has one, then acknowledges it.

Each product gets a fresh event id derived from the run id and the product id, so that a run
started again submits nothing twice: products the run already submitted are skipped
(`backfill_items`), and a task message that went out twice is one event to the worker.

Submission is chunked: per chunk one query decides the products, the chunk messages go out
as pre-built AMQP frames, RabbitMQ confirms them, and one transaction records the items. One
message per product is bounded by what RabbitMQ persists and confirms (about 4,600 messages/s
on a 2-core machine); a few hundred products per message are not.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from kombu import Connection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from schemas.backfill import (
    BackfillChunk,
    BackfillMode,
    BackfillRequest,
    JsonlSource,
    S3Source,
    SqlSource,
)
from schemas.events import EventType, ModelVersions, ProductCreated
from schemas.settings import Settings
from worker.errors import DeadLetterKind, InvalidEvent, TransientFault
from worker.intake import parse_event
from worker.stores import objects

log = structlog.get_logger(__name__)

TASK_NAME = "enrichment.enrich_product"
CHUNK_TASK_NAME = "enrichment.expand_backfill_chunk"
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "catalog-enrichment/backfill")
"""uuid5 namespace of backfilled event ids: uuid5(EVENT_NAMESPACE, f"{run_id}/{product_id}")."""


class InvalidBackfill(Exception):
    """The backfill cannot run as asked: its source is missing or unreadable, its query fails,
    or it names an existing run with another source or mode. Retrying would not help."""

    kind = DeadLetterKind.INVALID_BACKFILL


def event_id_for(run_id: str, product_id: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_NAMESPACE, f"{run_id}/{product_id}")


def event_id_text(run_id: str, product_id: str) -> str:
    """str(event_id_for(run_id, product_id)), made without a UUID object (a quarter of the
    time, which a backfill spends per product)."""
    digest = hashlib.sha1(EVENT_NAMESPACE.bytes + f"{run_id}/{product_id}".encode()).hexdigest()
    variant = "89ab"[int(digest[16], 16) & 0x3]
    return f"{digest[:8]}-{digest[8:12]}-5{digest[13:16]}-{variant}{digest[17:20]}-{digest[20:32]}"


def chunk_task_id(run_id: str, first_event_id: uuid.UUID | str) -> str:
    """A chunk message's task id, the same whenever the same chunk is sent."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{run_id}/chunk/{first_event_id}"))


def new_run_id() -> str:
    return f"bf-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


# Sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One product event as the source holds it, and where: `file:line`, `s3://key:line`."""

    position: str
    body: bytes | str


def read_source(request: BackfillRequest, settings: Settings) -> Iterator[Record]:
    """The source's records in order; a source that cannot be read raises InvalidBackfill."""
    source = request.source
    if isinstance(source, JsonlSource):
        return _jsonl_records(source.path)
    if isinstance(source, S3Source):
        return _s3_records(source.url, settings)
    return _sql_records(source, settings, itersize=request.chunk_size)


def _jsonl_records(path: Path) -> Iterator[Record]:
    if not path.is_file():
        raise InvalidBackfill(f"no such file: {path}")

    def records() -> Iterator[Record]:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield Record(f"{path}:{number}", line)

    return records()


def _s3_records(url: str, settings: Settings) -> Iterator[Record]:
    bucket, prefix = objects.split_s3_url(url)
    client = objects.make_client(settings.s3)
    keys = _s3_keys(client, bucket, prefix)
    if not keys:
        raise InvalidBackfill(f"no objects under {url}")

    def records() -> Iterator[Record]:
        for key in keys:
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                stream: Iterable[bytes] = (
                    gzip.GzipFile(fileobj=body) if key.endswith(".gz") else body.iter_lines()
                )
                for number, line in enumerate(stream, start=1):
                    if line.strip():
                        yield Record(f"s3://{bucket}/{key}:{number}", line)
            except ClientError as exc:
                raise InvalidBackfill(f"cannot read s3://{bucket}/{key}: {exc}") from exc
            except BotoCoreError as exc:
                raise TransientFault(f"reading s3://{bucket}/{key} failed: {exc}") from exc

    return records()


def _s3_keys(client: objects.S3Client, bucket: str, prefix: str) -> list[str]:
    """Every object key under the prefix, in S3's (lexicographic) order, folders left out."""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [
            entry["Key"]
            for page in pages
            for entry in page.get("Contents", [])
            if not entry["Key"].endswith("/")
        ]
    except ClientError as exc:
        raise InvalidBackfill(f"cannot list s3://{bucket}/{prefix}: {exc}") from exc
    except BotoCoreError as exc:
        raise TransientFault(f"listing s3://{bucket}/{prefix} failed: {exc}") from exc


def _sql_records(source: SqlSource, settings: Settings, *, itersize: int) -> Iterator[Record]:
    """The query's rows as product events, read through a server-side cursor in a read-only
    transaction; see schemas.backfill.SQL_COLUMNS for the columns."""
    secret = source.catalog_url or settings.database_url
    try:
        conn = psycopg.connect(secret.get_secret_value(), connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise TransientFault(f"the catalog database does not answer: {exc}") from exc
    conn.read_only = True
    cursor = conn.cursor(name="backfill_source", row_factory=dict_row)
    cursor.itersize = itersize
    try:
        cursor.execute(source.query.encode())
    except psycopg.OperationalError as exc:
        conn.close()
        raise TransientFault(f"the catalog query failed: {exc}") from exc
    except psycopg.Error as exc:
        conn.close()
        raise InvalidBackfill(f"the catalog query failed: {exc}".strip()) from exc
    _check_columns([column.name for column in cursor.description or []])

    def records() -> Iterator[Record]:
        with conn, cursor:
            occurred_at = datetime.now(UTC).isoformat()
            for number, row in enumerate(cursor, start=1):
                yield Record(f"row {number}", json.dumps(_row_event(row, occurred_at), default=str))

    return records()


def _check_columns(columns: list[str]) -> None:
    missing = [name for name in ("product_id", "title") if name not in columns]
    if "images" not in columns and "image_urls" not in columns:
        missing.append("images or image_urls")
    if missing:
        raise InvalidBackfill(
            f"the catalog query returns the columns {columns}; it must return product_id, title"
            ", images (jsonb, [{url, role}]) or image_urls (text[]), and may return description"
            f" and attributes (text[]); missing: {', '.join(missing)}"
        )


def _row_event(row: dict[str, Any], occurred_at: str) -> dict[str, Any]:
    """A product-created event of one row; columns the row lacks stay out, so that
    validation names them as missing."""
    event: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=0)),
        "event_type": str(EventType.PRODUCT_CREATED),
        "schema_version": 1,
        "occurred_at": occurred_at,
    }
    for name in ("product_id", "title", "description", "attributes"):
        if row.get(name) is not None:
            event[name] = row[name]
    images = row.get("images")
    if images is None and row.get("image_urls") is not None:
        images = [{"url": url} for url in row["image_urls"]]
    if images is not None:
        event["images"] = images
    return event


# Task messages ------------------------------------------------------------------------------


def _frame(kind: int, channel_id: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel_id, len(payload)) + payload + b"\xce"


class TaskFrames:
    """The AMQP 0-9-1 frames of Celery task messages (protocol 2) for one task and queue.

    py-amqp encodes each message's properties and headers in Python, at about a quarter of
    the rate a backfill needs. Backfill messages differ only in task id and body, so the
    content header is encoded once with a placeholder id of the same length (a UUID) and
    each message's id is put in its place; the frames are what py-amqp would write.
    """

    _PLACEHOLDER = "ffffffff-ffff-4fff-bfff-ffffffffffff"

    def __init__(
        self, *, channel_id: int, frame_max: int, routing_key: str, headers: dict[str, Any]
    ) -> None:
        import amqp
        from amqp.serialization import dumps

        self.channel_id = channel_id
        self.body_frame_max = frame_max - 8
        publish_args = dumps("Bssbb", (0, "", routing_key, True, False))
        self._method_frame = _frame(1, channel_id, struct.pack(">HH", 60, 40) + publish_args)

        message = amqp.Message(
            b"",
            content_type="application/json",
            content_encoding="utf-8",
            application_headers={**headers, "id": self._PLACEHOLDER, "root_id": self._PLACEHOLDER},
            delivery_mode=2,
            correlation_id=self._PLACEHOLDER,
            reply_to="",
        )
        properties: bytes = message._serialize_properties()
        self._property_parts = properties.split(self._PLACEHOLDER.encode())
        if len(self._property_parts) != 4:
            raise AssertionError("the task id must appear three times in the properties")

    def frames(self, task_id: str, body: bytes) -> bytes:
        """One message's method, header and body frames; `task_id` is a UUID string."""
        if len(task_id) != len(self._PLACEHOLDER):
            raise ValueError(f"task ids must be UUID strings, got {task_id!r}")
        header = struct.pack(">HHQ", 60, 0, len(body)) + task_id.encode().join(self._property_parts)
        parts = [self._method_frame, _frame(2, self.channel_id, header)]
        for start in range(0, len(body), self.body_frame_max):
            parts.append(_frame(3, self.channel_id, body[start : start + self.body_frame_max]))
        return b"".join(parts)


def task_headers(kwargsrepr: str, task: str = TASK_NAME) -> dict[str, Any]:
    """Celery's protocol-2 headers for a task without ETA, as apply_async builds them."""
    from worker.app import app

    message = app.amqp.as_task_v2(
        TaskFrames._PLACEHOLDER,
        task,
        args=(),
        kwargs={},
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        ignore_result=True,
    )
    return dict(message.headers)


def task_body(event_json: str) -> bytes:
    """A task's body as Celery's JSON serializer writes it: (args, kwargs, embed)."""
    return (
        '[[], {"event": '
        + event_json
        + '}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    ).encode()


def chunk_body(run_id: str, rate: float | None, event_jsons: Sequence[str]) -> bytes:
    """A chunk task's body: kwargs run_id, rate and events (schemas.backfill.BackfillChunk)."""
    return (
        '[[], {"run_id": '
        + json.dumps(run_id)
        + ', "rate": '
        + json.dumps(rate)
        + ', "events": ['
        + ", ".join(event_jsons)
        + ']}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    ).encode()


class TokenBucket:
    """At most `rate` products a second on average, in bursts of at most one second's worth."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()

    def take(self, count: int) -> None:
        """Take `count` tokens, sleeping until the bucket has refilled what is owed."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= count
        if self.tokens < 0:
            self._sleep(-self.tokens / self.rate)


class TaskPublisher:
    """Publishes task messages onto one queue with publisher confirms: `send` writes a chunk,
    `confirm` waits until RabbitMQ has it, so that one chunk is confirmed while the next is
    prepared."""

    def __init__(
        self,
        broker_url: str,
        queue: str,
        *,
        kwargsrepr: str,
        task: str = TASK_NAME,
        confirm_timeout_s: float = 60.0,
    ) -> None:
        self.queue = queue
        self.kwargsrepr = kwargsrepr
        self.task = task
        self.confirm_timeout_s = confirm_timeout_s
        self._connection = Connection(broker_url, connect_timeout=10)
        self._published = 0
        self._confirmed = 0
        self._refused = 0
        self._returned = 0

    def __enter__(self) -> TaskPublisher:
        try:
            self._connection.connect()
            self._raw = self._connection.connection
            channel = self._raw.channel()
            channel.queue_declare(self.queue, durable=True, auto_delete=False)
            channel.confirm_select()
        except (OSError, *self._connection.connection_errors) as exc:
            self._connection.release()
            raise TransientFault(f"RabbitMQ does not answer: {exc}") from exc
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._frames = TaskFrames(
            channel_id=channel.channel_id,
            frame_max=self._raw.frame_max,
            routing_key=self.queue,
            headers=task_headers(self.kwargsrepr, self.task),
        )
        return self

    def __exit__(self, *_: object) -> None:
        self._connection.release()

    def send(
        self,
        messages: Sequence[tuple[str, bytes]],
        bucket: TokenBucket | None = None,
        products: Sequence[int] = (),
    ) -> int:
        """Write (task id, body) messages without waiting; returns the delivery tag that
        `confirm` waits for. With a bucket, each message first takes its `products` count."""
        parts = [messages] if bucket is None else [[m] for m in messages]
        try:
            for index, part in enumerate(parts):
                if bucket is not None:
                    bucket.take(products[index] if products else 1)
                self._raw.transport.write(b"".join(self._frames.frames(*m) for m in part))
                self._raw.bytes_sent += 1
                self._published += len(part)
        except (OSError, *self._connection.connection_errors) as exc:
            raise TransientFault(f"publishing to {self.queue} failed: {exc}") from exc
        return self._published

    def confirm(self, delivery_tag: int) -> None:
        """Wait until RabbitMQ confirmed every message up to `delivery_tag`."""
        deadline = time.monotonic() + self.confirm_timeout_s
        while self._confirmed < delivery_tag:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientFault(
                    f"RabbitMQ confirmed {self._confirmed} of {delivery_tag} task messages"
                    f" within {self.confirm_timeout_s:g} s"
                )
            try:
                self._raw.drain_events(timeout=left)
            except TimeoutError:
                continue
            except (OSError, *self._connection.connection_errors) as exc:
                raise TransientFault(f"publishing to {self.queue} failed: {exc}") from exc
        if self._refused or self._returned:
            raise TransientFault(
                f"RabbitMQ refused {self._refused} and could not route {self._returned} task"
                f" messages to {self.queue}"
            )

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._confirmed = max(self._confirmed, delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._refused += 1
        self._on_ack(delivery_tag, multiple)

    def _on_return(self, *_: Any) -> None:
        self._returned += 1


# Runs ---------------------------------------------------------------------------------------


@dataclass
class PassCounts:
    """What one pass over the source found; `submitted` counts this pass only."""

    read: int = 0
    rejected: int = 0
    deleted: int = 0
    not_selected: int = 0
    already_submitted: int = 0
    duplicate: int = 0
    submitted: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class BackfillOutcome:
    run_id: str
    counts: PassCounts
    finished: bool
    position: int
    """Source records consumed, those skipped at the start included."""
    seconds: float

    @property
    def products_per_s(self) -> float:
        return self.counts.submitted / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Chunk:
    events: dict[str, ProductCreated] = field(default_factory=dict)
    rejects: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(position, field, value, allowed) of each record that is no valid event."""
    read: int = 0
    duplicate: int = 0


def run_backfill(
    request: BackfillRequest,
    settings: Settings,
    *,
    versions: ModelVersions | None = None,
    on_chunk: Callable[[BackfillOutcome], None] | None = None,
    deadline: float | None = None,
    skip: int = 0,
) -> BackfillOutcome:
    """Submit the products that `request` selects; returns what this pass did.

    `versions` are the current model versions (stale mode computes them when unset). With a
    `deadline` (time.monotonic()) the pass stops after the first chunk past it, unfinished;
    `skip` source records are passed over unread, as a continuation of such a pass does.
    """
    started = time.monotonic()
    run_id = request.run_id or new_run_id()
    if request.mode is BackfillMode.STALE and versions is None:
        from worker.models import current_model_versions

        versions = current_model_versions(settings.models)
    records = islice(read_source(request, settings), skip, None)
    counts, position = PassCounts(), skip
    bucket = TokenBucket(request.rate) if request.rate else None

    try:
        return _run_pass(
            request,
            settings,
            run_id,
            versions,
            records,
            counts,
            position,
            bucket,
            on_chunk,
            deadline,
            started,
        )
    except psycopg.OperationalError as exc:
        raise TransientFault(f"the enrichment database failed during the backfill: {exc}") from exc


def _run_pass(
    request: BackfillRequest,
    settings: Settings,
    run_id: str,
    versions: ModelVersions | None,
    records: Iterator[Record],
    counts: PassCounts,
    position: int,
    bucket: TokenBucket | None,
    on_chunk: Callable[[BackfillOutcome], None] | None,
    deadline: float | None,
    started: float,
) -> BackfillOutcome:
    with _connect(settings) as conn, _publisher(settings, run_id) as publisher:
        _open_run(conn, run_id, request, versions)
        # Pipeline mode: the confirmed chunk's items are written while the next chunk is
        # validated; the next selection waits for them.
        with conn.pipeline():
            # One chunk stays in flight: RabbitMQ confirms it while the next one is prepared.
            # The next chunk is validated while the database classifies this one.
            batches = _validated(records, request.chunk_size)
            batch, in_flight = next(batches, None), None
            asked = _ask(conn, run_id, versions, batch, counts, None) if batch else None
            while batch is not None:
                ahead = next(batches, None)
                position += batch.read
                sent = _send_chunk(publisher, bucket, request, run_id, batch, asked, counts)
                sent.position = position
                if in_flight is not None:
                    _confirm_chunk(conn, publisher, run_id, in_flight, counts)
                in_flight, batch = sent, ahead
                # The chunk read ahead is left for the continuation, which reads it again.
                if batch is not None and deadline is not None and time.monotonic() > deadline:
                    _confirm_chunk(conn, publisher, run_id, in_flight, counts)
                    batches.close()
                    outcome = BackfillOutcome(
                        run_id, counts, False, in_flight.position, time.monotonic() - started
                    )
                    log.info(
                        "backfill_paused",
                        run_id=run_id,
                        position=outcome.position,
                        **counts.as_dict(),
                    )
                    return outcome
                if batch is not None:
                    asked = _ask(conn, run_id, versions, batch, counts, in_flight)
                if on_chunk is not None:
                    on_chunk(
                        BackfillOutcome(
                            run_id, counts, False, in_flight.position, time.monotonic() - started
                        )
                    )
            if in_flight is not None:
                _confirm_chunk(conn, publisher, run_id, in_flight, counts)
            _finish_run(conn, run_id, counts)

    outcome = BackfillOutcome(run_id, counts, True, position, time.monotonic() - started)
    log.info(
        "backfill_submitted",
        run_id=run_id,
        mode=str(request.mode),
        seconds=round(outcome.seconds, 3),
        products_per_s=round(outcome.products_per_s),
        **counts.as_dict(),
    )
    return outcome


class _Item(NamedTuple):
    """A selected product: its backfill event id and its event as JSON with that id."""

    product_id: str
    event_id: str
    event_json: str


@dataclass
class _SentChunk:
    """A chunk whose task messages are out, waiting for RabbitMQ's confirms."""

    events: list[_Item]
    rejects: list[tuple[str, str, str, str]]
    delivery_tag: int
    position: int = 0
    """Source records consumed once this chunk is recorded."""


def _ask(
    conn: psycopg.Connection[Any],
    run_id: str,
    versions: ModelVersions | None,
    chunk: _Chunk,
    counts: PassCounts,
    in_flight: _SentChunk | None,
) -> psycopg.Cursor[Any] | None:
    """Count a validated chunk and send its classification query, without waiting for it.
    Products of the chunk still in flight count as duplicates: their items are not written
    yet, so the query cannot see them."""
    counts.read += chunk.read
    counts.rejected += len(chunk.rejects)
    counts.duplicate += chunk.duplicate
    for item in in_flight.events if in_flight else []:
        if chunk.events.pop(item.product_id, None) is not None:
            counts.duplicate += 1
    if not chunk.events:
        return None
    return conn.execute(
        _CLASSIFY,
        {
            "run_id": run_id,
            "ids": list(chunk.events),
            "versions": Jsonb(versions.model_dump()) if versions else None,
        },
    )


def _send_chunk(
    publisher: TaskPublisher,
    bucket: TokenBucket | None,
    request: BackfillRequest,
    run_id: str,
    chunk: _Chunk,
    asked: psycopg.Cursor[Any] | None,
    counts: PassCounts,
) -> _SentChunk:
    """Publish the products of a chunk that its classification selects."""
    rows = asked.fetchall() if asked is not None else []
    selected = _select(rows, run_id, request.mode, chunk.events, counts)

    step = request.products_per_message
    groups = [selected[start : start + step] for start in range(0, len(selected), step)]
    messages = [
        (
            chunk_task_id(run_id, group[0].event_id),
            chunk_body(run_id, request.rate, [item.event_json for item in group]),
        )
        for group in groups
    ]
    tag = publisher.send(messages, bucket, [len(group) for group in groups])

    return _SentChunk(selected, chunk.rejects, tag)


def _confirm_chunk(
    conn: psycopg.Connection[Any],
    publisher: TaskPublisher,
    run_id: str,
    chunk: _SentChunk,
    counts: PassCounts,
) -> None:
    """Wait for the chunk's confirms, then record its items: an item is a confirmed message."""
    publisher.confirm(chunk.delivery_tag)
    counts.submitted += len(chunk.events)
    _record(conn, run_id, chunk.events, chunk.rejects, counts)


# Chunk expansion (on a worker) ----------------------------------------------------------------


@dataclass(frozen=True)
class Expansion:
    """What one expansion of a chunk did: tasks published now, items a previous delivery had
    already expanded, and the events left for the chunk sent on after `countdown_s`."""

    published: int
    already_expanded: int
    rest: list[dict[str, Any]]
    countdown_s: float


def expand_chunk(chunk: BackfillChunk, settings: Settings) -> Expansion:
    """Publish one enrich_product task per event of the chunk onto the backfill queue, with
    the event id as task id, confirmed by RabbitMQ, then mark the items expanded.

    With a rate, one slice of at most max(1, rate) events is expanded now and the rest waits
    for the time that slice takes at that rate. Events a previous delivery of the chunk
    expanded (`backfill_items.expanded_at`) are not published again; a worker lost between
    the confirm and the mark sends them twice, which the worker sees as one event.
    """
    slice_size = len(chunk.events) if chunk.rate is None else max(1, int(chunk.rate))
    now, rest = chunk.events[:slice_size], chunk.events[slice_size:]
    countdown_s = len(now) / chunk.rate if chunk.rate and rest else 0.0

    try:
        with _connect(settings) as conn:
            expanded = _expanded(conn, chunk.run_id, now)
            todo = [event for event in now if event["product_id"] not in expanded]
            if todo:
                _publish_tasks(settings, chunk.run_id, todo)
                _mark_expanded(conn, chunk.run_id, todo)
    except psycopg.OperationalError as exc:
        raise TransientFault(f"the enrichment database failed during an expansion: {exc}") from exc

    log.info(
        "backfill_chunk_expanded",
        run_id=chunk.run_id,
        published=len(todo),
        already_expanded=len(now) - len(todo),
        rest=len(rest),
    )
    return Expansion(len(todo), len(now) - len(todo), rest, countdown_s)


def _expanded(conn: psycopg.Connection[Any], run_id: str, events: list[dict[str, Any]]) -> set[str]:
    rows = conn.execute(
        "SELECT product_id FROM backfill_items WHERE run_id = %s AND product_id = ANY(%s)"
        " AND expanded_at IS NOT NULL",
        (run_id, [event["product_id"] for event in events]),
    ).fetchall()
    return {row[0] for row in rows}


def _publish_tasks(settings: Settings, run_id: str, events: list[dict[str, Any]]) -> None:
    publisher = TaskPublisher(
        settings.broker_url.get_secret_value(),
        settings.backfill_queue,
        kwargsrepr=f"{{'event': <product event of backfill {run_id}>}}",
    )
    messages = [(str(event["event_id"]), task_body(json.dumps(event))) for event in events]
    with publisher:
        publisher.confirm(publisher.send(messages))


def _mark_expanded(
    conn: psycopg.Connection[Any], run_id: str, events: list[dict[str, Any]]
) -> None:
    """Items the client has not recorded yet (its confirm and this expansion race) are
    written here; the client's insert then leaves them as they are."""
    conn.execute(
        "INSERT INTO backfill_items (run_id, product_id, event_id, expanded_at)"
        " SELECT %s, p, e, now() FROM unnest(%s::text[], %s::uuid[]) AS u (p, e)"
        " ON CONFLICT (run_id, product_id) DO UPDATE SET expanded_at = excluded.expanded_at",
        (
            run_id,
            [event["product_id"] for event in events],
            [str(event["event_id"]) for event in events],
        ),
    )


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            settings.database_url.get_secret_value(), autocommit=True, connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        raise TransientFault(f"the enrichment database does not answer: {exc}") from exc


def _publisher(settings: Settings, run_id: str) -> TaskPublisher:
    return TaskPublisher(
        settings.broker_url.get_secret_value(),
        settings.backfill_queue,
        kwargsrepr=f"{{'run_id': {run_id!r}, 'events': <product events>}}",
        task=CHUNK_TASK_NAME,
    )


def _open_run(
    conn: psycopg.Connection[Any],
    run_id: str,
    request: BackfillRequest,
    versions: ModelVersions | None,
) -> None:
    """Start the run, or a new pass of it; a run with another source or mode is refused."""
    source, mode = request.source.describe(), str(request.mode)
    options = {"rate": request.rate, "chunk_size": request.chunk_size}
    model_versions = Jsonb(versions.model_dump()) if versions else None
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO backfill_runs (run_id, source, mode, options, model_versions)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE"
            " SET passes = backfill_runs.passes + 1, options = excluded.options,"
            " model_versions = excluded.model_versions, finished_at = NULL, updated_at = now()"
            " WHERE backfill_runs.source = excluded.source AND backfill_runs.mode = excluded.mode"
            " RETURNING passes",
            (run_id, source, mode, Jsonb(options), model_versions),
        ).fetchone()
    if row is None:
        theirs = conn.execute(
            "SELECT source, mode FROM backfill_runs WHERE run_id = %s", (run_id,)
        ).fetchone()
        raise InvalidBackfill(
            f"run {run_id!r} was started with mode {theirs[1] if theirs else '?'} from"
            f" {theirs[0] if theirs else '?'}; resuming it needs the same source and mode,"
            f" not {mode} from {source}"
        )
    log.info("backfill_started", run_id=run_id, source=source, mode=mode, passes=row[0])


def _validated(records: Iterator[Record], size: int) -> Generator[_Chunk, None, None]:
    """The source's records in validated chunks of `size`."""
    while batch := list(islice(records, size)):
        yield _validate(batch)


def _validate(batch: list[Record]) -> _Chunk:
    """Valid events keyed by product (the first of a product's events wins); the rest as
    (position, field, reason) rejects."""
    chunk = _Chunk(read=len(batch))
    for record in batch:
        try:
            event = parse_event(record.body)
        except InvalidEvent as exc:
            chunk.rejects.append((record.position, exc.field, exc.value, exc.allowed))
            log.warning(
                "backfill_event_rejected",
                position=record.position,
                field=exc.field,
                value=exc.value,
                allowed=exc.allowed,
                outcome="skipped",
            )
            continue
        if event.product_id in chunk.events:
            chunk.duplicate += 1
            continue
        chunk.events[event.product_id] = event
    return chunk


_CLASSIFY = """
SELECT p.product_id,
       CASE
           WHEN EXISTS (SELECT 1 FROM deleted_products d WHERE d.product_id = p.product_id)
               THEN 'deleted'
           WHEN EXISTS (SELECT 1 FROM backfill_items i
                        WHERE i.run_id = %(run_id)s AND i.product_id = p.product_id)
               THEN 'submitted'
           WHEN latest.model_versions IS NULL THEN 'missing'
           WHEN %(versions)s::jsonb IS NOT NULL AND latest.model_versions <> %(versions)s::jsonb
               THEN 'stale'
           ELSE 'current'
       END
FROM unnest(%(ids)s::text[]) AS p (product_id)
LEFT JOIN LATERAL (
    SELECT e.model_versions FROM enrichments e
    WHERE e.product_id = p.product_id AND e.status = 'enriched'
    ORDER BY e.created_at DESC, e.enrichment_id DESC LIMIT 1
) latest ON true
"""

_MODE_CLASSES = {
    BackfillMode.MISSING: {"missing"},
    BackfillMode.STALE: {"stale"},
    BackfillMode.ALL: {"missing", "stale", "current"},
}


def _select(
    rows: list[tuple[str, str]],
    run_id: str,
    mode: BackfillMode,
    events: dict[str, ProductCreated],
    counts: PassCounts,
) -> list[_Item]:
    """The chunk's products that the mode selects (rows: product id and class), as events
    with their backfill event ids and the submission time (the other fields as the source
    had them)."""
    classes = Counter(row[1] for row in rows)
    counts.deleted += classes["deleted"]
    counts.already_submitted += classes["submitted"]
    wanted = _MODE_CLASSES[mode]
    counts.not_selected += sum(
        n for name, n in classes.items() if name in {"missing", "stale", "current"} - wanted
    )
    occurred_at = json.dumps(datetime.now(UTC).isoformat())
    items = []
    for product_id, kind in rows:
        if kind in wanted:
            event_id = event_id_text(run_id, product_id)
            rest = events[product_id].model_dump_json(exclude=_RESTAMPED)
            head = (
                f'{{"event_id": "{event_id}", "occurred_at": {occurred_at}, '
                f'"backfill_run_id": {json.dumps(run_id)}, '
            )
            items.append(_Item(product_id, event_id, head + rest[1:]))
    return items


_RESTAMPED = {"event_id", "occurred_at", "backfill_run_id"}


def _record(
    conn: psycopg.Connection[Any],
    run_id: str,
    submitted: list[_Item],
    rejects: list[tuple[str, str, str, str]],
    counts: PassCounts,
) -> None:
    """The confirmed chunk's items, its rejects and the pass's counts, in one statement (so
    atomic without a transaction block, which would wait for it in pipeline mode)."""
    rejected = list(map(list, zip(*rejects, strict=True))) if rejects else [[], [], [], []]
    conn.execute(
        "WITH items AS (INSERT INTO backfill_items (run_id, product_id, event_id)"
        " SELECT %(run_id)s, p, e FROM unnest(%(products)s::text[], %(events)s::uuid[])"
        " AS u (p, e) ON CONFLICT DO NOTHING),"
        " rejects AS (INSERT INTO backfill_rejects (run_id, position, field, value, allowed)"
        " SELECT %(run_id)s, p, f, v, a"
        " FROM unnest(%(positions)s::text[], %(fields)s::text[], %(values)s::text[],"
        " %(allowed)s::text[]) AS u (p, f, v, a) ON CONFLICT DO NOTHING)"
        " UPDATE backfill_runs SET counts = %(counts)s, updated_at = now()"
        " WHERE run_id = %(run_id)s",
        {
            "run_id": run_id,
            "products": [e.product_id for e in submitted],
            "events": [e.event_id for e in submitted],
            "positions": rejected[0],
            "fields": rejected[1],
            "values": rejected[2],
            "allowed": rejected[3],
            "counts": Jsonb(counts.as_dict()),
        },
    )


def _finish_run(conn: psycopg.Connection[Any], run_id: str, counts: PassCounts) -> None:
    conn.execute(
        "UPDATE backfill_runs SET counts = %s, finished_at = now(), updated_at = now()"
        " WHERE run_id = %s",
        (Jsonb(counts.as_dict()), run_id),
    )


# Progress and status ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunProgress:
    """A run as `enrich status` shows it: counts of its items by their enrichment."""

    run_id: str
    source: str
    mode: str
    passes: int
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]
    submitted: int
    done: int
    failed: int

    @property
    def pending(self) -> int:
        return self.submitted - self.done - self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "source": self.source,
            "mode": self.mode,
            "passes": self.passes,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "last_pass": self.counts,
            "submitted": self.submitted,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
        }


@dataclass(frozen=True)
class FailureGroup:
    """Failed enrichments (or rejected source records) of one kind, with the commonest reasons."""

    kind: str
    count: int
    reasons: list[tuple[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "count": self.count,
            "reasons": [{"reason": r, "count": n} for r, n in self.reasons],
        }


_PROGRESS = """
SELECT r.run_id, r.source, r.mode, r.passes, r.started_at, r.finished_at, r.counts,
       coalesce(i.submitted, 0), coalesce(i.done, 0), coalesce(i.failed, 0)
FROM backfill_runs r
LEFT JOIN LATERAL (
    SELECT count(*) AS submitted,
           count(*) FILTER (WHERE e.status = 'enriched') AS done,
           count(*) FILTER (WHERE e.status = 'failed') AS failed
    FROM backfill_items it LEFT JOIN enrichments e ON e.event_id = it.event_id
    WHERE it.run_id = r.run_id
) i ON true
"""


def run_progress(conn: psycopg.Connection[Any], run_id: str) -> RunProgress | None:
    row = conn.execute(_PROGRESS + " WHERE r.run_id = %s", (run_id,)).fetchone()
    return None if row is None else RunProgress(*row)


def latest_runs(conn: psycopg.Connection[Any], limit: int = 10) -> list[RunProgress]:
    rows = conn.execute(_PROGRESS + " ORDER BY r.started_at DESC LIMIT %s", (limit,)).fetchall()
    return [RunProgress(*row) for row in rows]


def run_failures(
    conn: psycopg.Connection[Any], run_id: str, reasons_per_kind: int = 5
) -> list[FailureGroup]:
    """The run's failed enrichments by error kind, each with its commonest reasons."""
    rows = conn.execute(
        "SELECT coalesce(e.error_kind, 'unknown'), coalesce(e.error_reason, ''), count(*)"
        " FROM backfill_items i JOIN enrichments e ON e.event_id = i.event_id"
        " WHERE i.run_id = %s AND e.status = 'failed' GROUP BY 1, 2",
        (run_id,),
    ).fetchall()
    return _groups(rows, reasons_per_kind)


def run_rejects(
    conn: psycopg.Connection[Any], run_id: str, reasons_per_kind: int = 5
) -> list[FailureGroup]:
    """The run's rejected source records by field, each with what the field allows and one
    position where that was broken."""
    rows = conn.execute(
        "SELECT field, allowed || ' (e.g. ' || (array_agg(position || ', received ' || value"
        " ORDER BY position))[1] || ')', count(*) FROM backfill_rejects WHERE run_id = %s"
        " GROUP BY field, allowed",
        (run_id,),
    ).fetchall()
    return _groups(rows, reasons_per_kind)


def _groups(rows: Sequence[tuple[str, str, int]], reasons_per_kind: int) -> list[FailureGroup]:
    by_kind: dict[str, Counter[str]] = {}
    for kind, reason, count in rows:
        by_kind.setdefault(kind, Counter())[reason] += count
    groups = [
        FailureGroup(kind, sum(reasons.values()), reasons.most_common(reasons_per_kind))
        for kind, reasons in by_kind.items()
    ]
    return sorted(groups, key=lambda group: (-group.count, group.kind))


# The commands ---------------------------------------------------------------------------------


def backfill_command(
    settings: Settings, request: BackfillRequest, *, wait: bool, poll_s: float = 1.0
) -> int:
    """`enrich backfill`: submit with a progress bar, then (with `wait`) follow the workers
    until every submitted product is done or failed. Returns the exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    request = request.model_copy(update={"run_id": request.run_id or new_run_id()})
    run_id = str(request.run_id)
    console.print(f"backfill run {run_id} (run again with --run-id {run_id} to resume)")
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("submitting", total=None, line="")
        follow = _Follower(settings, run_id, bar, task, poll_s)
        try:
            outcome = run_backfill(request, settings, on_chunk=follow.on_chunk)
        except InvalidBackfill as exc:
            console.print(f"cannot backfill: {exc}")
            return 2
        except TransientFault as exc:
            console.print(f"backfill stopped: {exc}; run it again with --run-id {run_id}")
            return 1
        follow.show_progress()
        print(_summary(outcome))
        if not wait:
            return 0
        try:
            follow.until_done()
        except KeyboardInterrupt:
            console.print(f"the workers go on; see `enrich status --run {run_id}`")
            return 130
    return print_status(settings, run_id, as_json=False)


class _Follower:
    """The progress bar's counts, read from the database at most every `poll_s`."""

    def __init__(self, settings: Settings, run_id: str, bar: Any, task: Any, poll_s: float):
        self.settings, self.run_id, self.bar, self.task, self.poll_s = (
            settings,
            run_id,
            bar,
            task,
            poll_s,
        )
        self._last = 0.0

    def on_chunk(self, outcome: BackfillOutcome) -> None:
        if time.monotonic() - self._last >= self.poll_s:
            self.show_progress()

    def show_progress(self) -> RunProgress | None:
        self._last = time.monotonic()
        with _connect(self.settings) as conn:
            progress = run_progress(conn, self.run_id)
        if progress is not None:
            self.bar.update(
                self.task,
                total=max(progress.submitted, 1),
                completed=progress.done + progress.failed,
                line=f"submitted {progress.submitted}  done {progress.done}"
                f"  failed {progress.failed}  pending {progress.pending}",
            )
        return progress

    def until_done(self) -> None:
        self.bar.update(self.task, description="enriching")
        while True:
            progress = self.show_progress()
            if progress is None or progress.pending <= 0:
                return
            time.sleep(self.poll_s)


def _summary(outcome: BackfillOutcome) -> str:
    counts = outcome.counts
    return (
        f"submitted {counts.submitted} products in {outcome.seconds:.2f} s"
        f" ({outcome.products_per_s:.0f} products/s); read {counts.read}, rejected"
        f" {counts.rejected}, deleted {counts.deleted}, not selected {counts.not_selected},"
        f" already submitted {counts.already_submitted}, duplicate {counts.duplicate}"
    )


def print_status(settings: Settings, run_id: str | None, *, as_json: bool) -> int:
    """`enrich status`: one run with its failures grouped, or the latest runs."""
    with _connect(settings) as conn:
        if run_id is None:
            runs = latest_runs(conn)
            if as_json:
                print(json.dumps({"runs": [run.as_dict() for run in runs]}))
            else:
                _print_runs(runs)
            return 0

        progress = run_progress(conn, run_id)
        if progress is None:
            print(f"no backfill run {run_id!r}", file=sys.stderr)
            return 1
        failures, rejects = run_failures(conn, run_id), run_rejects(conn, run_id)

    if as_json:
        document = {
            "run": progress.as_dict(),
            "failures": [group.as_dict() for group in failures],
            "rejects": [group.as_dict() for group in rejects],
        }
        print(json.dumps(document))
        return 0
    _print_run(progress, failures, rejects)
    return 0


def _print_runs(runs: list[RunProgress]) -> None:
    print(
        f"{'run':<32} {'mode':<8} {'started':<20} {'submitted':>9} {'done':>8} {'failed':>7}"
        f" {'pending':>8}  submission"
    )
    for run in runs:
        state = "finished" if run.finished_at else "stopped or running"
        print(
            f"{run.run_id:<32} {run.mode:<8} {run.started_at:%Y-%m-%d %H:%M:%S}"
            f" {run.submitted:>9} {run.done:>8} {run.failed:>7} {run.pending:>8}  {state}"
        )
    if not runs:
        print("no backfill runs yet")


def _print_run(run: RunProgress, failures: list[FailureGroup], rejects: list[FailureGroup]) -> None:
    finished = f"{run.finished_at:%Y-%m-%d %H:%M:%S}" if run.finished_at else "not finished"
    print(f"run {run.run_id}: mode {run.mode}, source {run.source}")
    print(f"started {run.started_at:%Y-%m-%d %H:%M:%S}, passes {run.passes}, submission {finished}")
    print(f"submitted {run.submitted}  done {run.done}  failed {run.failed}  pending {run.pending}")
    print("last pass: " + ", ".join(f"{name} {count}" for name, count in run.counts.items()))
    for title, groups in (("failed enrichments", failures), ("rejected source records", rejects)):
        if groups:
            print(f"{title}:")
        for group in groups:
            print(f"  {group.kind}: {group.count}")
            for reason, count in group.reasons:
                print(f"    {count:>6}  {reason[:300]}")
