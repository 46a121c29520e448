"""Backfills against the real RabbitMQ, Postgres and S3: what is submitted, resumed, counted."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from amqp.method_framing import frame_writer
from amqp.spec import Basic
from kombu import Connection, Message, Queue
from pydantic import SecretStr

from schemas.backfill import (
    BackfillChunk,
    BackfillMode,
    BackfillRequest,
    JsonlSource,
    S3Source,
    SqlSource,
)
from schemas.events import ModelVersions
from schemas.settings import Settings
from tests.schemas.test_events import product_payload
from tests.worker.catalog import catalog_database
from worker import backfill
from worker.backfill import (
    InvalidBackfill,
    TaskFrames,
    TokenBucket,
    event_id_for,
    run_backfill,
    run_failures,
    run_progress,
    run_rejects,
)
from worker.local import LocalStack
from worker.stores import objects

CURRENT = ModelVersions(segmentation="seg@1", tagging="tag@1", embedding="emb@1")
OLD = ModelVersions(segmentation="seg@0", tagging="tag@1", embedding="emb@1")


@pytest.fixture
def settings(stack: LocalStack) -> Iterator[Settings]:
    """The stack's settings with a database and a backfill queue of this test's own."""
    queue = f"backfill.test.{uuid.uuid4().hex[:8]}"
    with catalog_database(stack) as url:
        yield stack.settings.model_copy(
            update={"database_url": SecretStr(url), "backfill_queue": queue}
        )
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        connection.channel().queue_delete(queue)


def write_events(path: Path, events: list[dict[str, Any]], *extra_lines: str) -> Path:
    path.write_text("".join(json.dumps(event) + "\n" for event in events) + "".join(extra_lines))
    return path


def queued(settings: Settings) -> list[Message]:
    """Take every message off the backfill queue."""
    messages = []
    with Connection(settings.broker_url.get_secret_value()) as connection:
        queue = Queue(settings.backfill_queue, durable=True)(connection.channel())
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


def queued_events(settings: Settings) -> list[dict[str, Any]]:
    """The product events of every message on the backfill queue, chunks unpacked."""
    events: list[dict[str, Any]] = []
    for message in queued(settings):
        _, kwargs, _ = json.loads(message.body)
        events.extend(kwargs["events"] if "events" in kwargs else [kwargs["event"]])
    return events


def expand(settings: Settings, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]) -> Any:
    """Run the chunk task as a worker would; returns its result and the chunks it sent on."""
    from worker import tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    sent_on: list[dict[str, Any]] = []
    monkeypatch.setattr(
        tasks.expand_backfill_chunk, "apply_async", lambda **options: sent_on.append(options)
    )
    return tasks.expand_backfill_chunk.apply(kwargs=kwargs).get(), sent_on


def jsonl_request(path: Path, mode: BackfillMode = BackfillMode.ALL, **changes: Any) -> Any:
    return BackfillRequest(source=JsonlSource(path=path), mode=mode, **changes)


def enrich_rows(url: str, rows: list[tuple[str, str, ModelVersions, str | None]]) -> None:
    """Enrichments as the worker writes them: (product id, status, versions, error kind)."""
    with psycopg.connect(url) as conn:
        for product_id, status, versions, kind in rows:
            conn.execute(
                "INSERT INTO products (product_id, title) VALUES (%s, 't') ON CONFLICT DO NOTHING",
                (product_id,),
            )
            conn.execute(
                "INSERT INTO enrichments (event_id, product_id, status, model_versions,"
                " error_kind, error_reason) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    uuid.uuid4(),
                    product_id,
                    status,
                    versions.model_dump_json(),
                    kind,
                    f"{kind} of {product_id}" if kind else None,
                ),
            )


def test_task_frames_are_the_bytes_py_amqp_writes_for_the_same_message() -> None:
    headers = {"lang": "py", "task": backfill.TASK_NAME, "retries": 0, "timelimit": [None, None]}
    frames = TaskFrames(channel_id=3, frame_max=4096, routing_key="q", headers=headers)
    task_id = str(uuid.uuid4())
    import amqp

    for body in (b'[[], {"event": {}}, {}]', b"x" * 10_000):
        written = io.BytesIO()
        connection = type("Stub", (), {"frame_max": 4096, "bytes_sent": 0})()
        transport = type("Transport", (), {"write": lambda _, data, out=written: out.write(data)})()
        message = amqp.Message(
            body,
            content_type="application/json",
            content_encoding="utf-8",
            application_headers={**headers, "id": task_id, "root_id": task_id},
            delivery_mode=2,
            correlation_id=task_id,
            reply_to="",
        )
        args = amqp.serialization.dumps("Bssbb", (0, "", "q", True, False))

        frame_writer(connection, transport)(1, 3, Basic.Publish, args, message)

        assert frames.frames(task_id, body) == written.getvalue()


def test_event_ids_made_as_text_are_the_uuid5_of_run_and_product() -> None:
    pairs = [(f"run-{i}", f"p-{i * 7919}") for i in range(2000)]

    made = [backfill.event_id_text(run_id, product_id) for run_id, product_id in pairs]

    assert made == [str(event_id_for(run_id, product_id)) for run_id, product_id in pairs]


def test_the_token_bucket_sleeps_for_what_goes_past_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(100, clock=lambda: now[0], sleep=sleep)

    for _ in range(30):
        bucket.take(10)

    assert sum(slept) == pytest.approx(2.0)


def test_submits_every_valid_product_once_and_records_the_invalid_lines(
    settings: Settings, tmp_path: Path
) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(5)]
    source = write_events(
        tmp_path / "events.jsonl",
        [*events, events[0]],
        "not json\n",
        json.dumps(product_payload(product_id="p-bad", images=[])) + "\n",
    )
    request = jsonl_request(source, run_id="run-1", chunk_size=2)

    outcome = run_backfill(request, settings)

    messages = queued(settings)
    assert outcome.finished
    assert outcome.counts.submitted == 5
    assert (outcome.counts.rejected, outcome.counts.read) == (2, 8)
    assert {m.headers["task"] for m in messages} == {backfill.CHUNK_TASK_NAME}
    chunks = [json.loads(m.body)[1] for m in messages]
    bodies = [event for chunk in chunks for event in chunk["events"]]
    assert {chunk["run_id"] for chunk in chunks} == {"run-1"}
    assert sorted(e["product_id"] for e in bodies) == [f"p-{i}" for i in range(5)]
    for event in bodies:
        assert event["event_id"] == str(event_id_for("run-1", event["product_id"]))
        assert event["backfill_run_id"] == "run-1"
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        rejects = run_rejects(conn, "run-1")
    assert sorted(group.kind for group in rejects) == ["body", "images"]


def test_a_resumed_run_skips_the_products_it_submitted(settings: Settings, tmp_path: Path) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(5)]
    run_backfill(
        jsonl_request(write_events(tmp_path / "a.jsonl", events[:3]), run_id="r"), settings
    )
    first = queued_events(settings)

    again = run_backfill(
        jsonl_request(write_events(tmp_path / "a.jsonl", events), run_id="r"), settings
    )

    second = queued_events(settings)
    assert [e["product_id"] for e in first] == ["p-0", "p-1", "p-2"]
    assert [e["product_id"] for e in second] == ["p-3", "p-4"]
    assert (again.counts.already_submitted, again.counts.submitted) == (3, 2)


def test_a_run_id_cannot_be_resumed_with_another_mode(settings: Settings, tmp_path: Path) -> None:
    source = write_events(tmp_path / "a.jsonl", [product_payload()])
    run_backfill(jsonl_request(source, run_id="r"), settings)

    with pytest.raises(InvalidBackfill, match="same source and mode"):
        run_backfill(jsonl_request(source, BackfillMode.MISSING, run_id="r"), settings)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (BackfillMode.MISSING, ["p-failed", "p-new"]),
        (BackfillMode.STALE, ["p-old"]),
        (BackfillMode.ALL, ["p-current", "p-failed", "p-new", "p-old"]),
    ],
)
def test_the_mode_selects_its_products_and_never_a_deleted_one(
    settings: Settings, tmp_path: Path, mode: BackfillMode, expected: list[str]
) -> None:
    url = settings.database_url.get_secret_value()
    enrich_rows(
        url,
        [
            ("p-current", "enriched", OLD, None),
            ("p-current", "enriched", CURRENT, None),
            ("p-old", "enriched", OLD, None),
            ("p-failed", "failed", CURRENT, "stage_failed"),
            ("p-deleted", "enriched", OLD, None),
        ],
    )
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO deleted_products (product_id, deleted_at) VALUES ('p-deleted', now())"
        )
    ids = ["p-current", "p-old", "p-failed", "p-deleted", "p-new"]
    source = write_events(tmp_path / "a.jsonl", [product_payload(product_id=i) for i in ids])

    outcome = run_backfill(jsonl_request(source, mode), settings, versions=CURRENT)

    assert sorted(e["product_id"] for e in queued_events(settings)) == expected
    assert outcome.counts.deleted == 1
    assert outcome.counts.not_selected == 4 - len(expected)


def test_status_counts_done_and_failed_from_the_enrichments_of_the_runs_events(
    settings: Settings, tmp_path: Path
) -> None:
    url = settings.database_url.get_secret_value()
    events = [product_payload(product_id=f"p-{i}") for i in range(4)]
    run_backfill(jsonl_request(write_events(tmp_path / "a.jsonl", events), run_id="r"), settings)
    with psycopg.connect(url) as conn:
        for product_id, status, kind in [
            ("p-0", "enriched", None),
            ("p-1", "failed", "unreadable_image"),
            ("p-2", "failed", "unreadable_image"),
        ]:
            conn.execute("INSERT INTO products (product_id, title) VALUES (%s, 't')", (product_id,))
            conn.execute(
                "INSERT INTO enrichments (event_id, product_id, status, model_versions,"
                " error_kind, error_reason) VALUES (%s, %s, %s, '{}', %s, %s)",
                (
                    event_id_for("r", product_id),
                    product_id,
                    status,
                    kind,
                    "S3 answered NoSuchKey" if kind else None,
                ),
            )

    with psycopg.connect(url) as conn:
        progress = run_progress(conn, "r")
        failures = run_failures(conn, "r")

    assert progress is not None
    assert (progress.submitted, progress.done, progress.failed, progress.pending) == (4, 1, 2, 1)
    assert [(g.kind, g.count, g.reasons) for g in failures] == [
        ("unreadable_image", 2, [("S3 answered NoSuchKey", 2)])
    ]


def test_a_catalog_query_gives_one_product_event_per_row(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO products (product_id, title, attributes, image_urls) VALUES"
            " ('p-1', 'Jeans', '{slim fit}', '{s3://catalog-images/p-1.jpg}'),"
            " ('p-2', 'Shirt', '{}', '{}')"
        )
    query = "SELECT product_id, title, description, attributes, image_urls FROM products"
    request = BackfillRequest(source=SqlSource(query=query), mode=BackfillMode.ALL)

    outcome = run_backfill(request, settings)

    events = queued_events(settings)
    assert [(e["product_id"], e["attributes"], e["images"]) for e in events] == [
        ("p-1", ["slim fit"], [{"url": "s3://catalog-images/p-1.jpg", "role": None}])
    ]
    assert outcome.counts.rejected == 1


def test_a_catalog_query_without_the_needed_columns_is_refused(settings: Settings) -> None:
    request = BackfillRequest(source=SqlSource(query="SELECT 1 AS product_id"))

    with pytest.raises(InvalidBackfill, match="missing: title, images or image_urls"):
        run_backfill(request, settings)


def test_jsonl_objects_under_an_s3_prefix_are_read_in_key_order(
    settings: Settings, stack: LocalStack
) -> None:
    client = objects.make_client(settings.s3)
    objects.ensure_bucket(client, "backfill-sources")
    prefix = f"exports/{uuid.uuid4().hex[:8]}/"
    lines = [json.dumps(product_payload(product_id=f"p-{i}")) + "\n" for i in range(3)]
    client.put_object(Bucket="backfill-sources", Key=prefix + "a.jsonl", Body="".join(lines[:2]))
    client.put_object(
        Bucket="backfill-sources", Key=prefix + "b.jsonl.gz", Body=gzip.compress(lines[2].encode())
    )
    request = BackfillRequest(
        source=S3Source(url=f"s3://backfill-sources/{prefix}"), mode=BackfillMode.ALL
    )

    outcome = run_backfill(request, settings)

    assert [e["product_id"] for e in queued_events(settings)] == ["p-0", "p-1", "p-2"]
    assert outcome.counts.submitted == 3


def test_the_celery_task_submits_in_slices_that_continue_the_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks

    monkeypatch.setattr(
        tasks, "get_settings", lambda: settings.model_copy(update={"backfill_slice_s": 1e-6})
    )
    continued: list[dict[str, Any]] = []
    monkeypatch.setattr(
        tasks.start_backfill, "apply_async", lambda kwargs: continued.append(kwargs)
    )
    events = [product_payload(product_id=f"p-{i}") for i in range(3)]
    request = {
        "source": {"kind": "jsonl", "path": str(write_events(tmp_path / "a.jsonl", events))},
        "mode": "all",
        "chunk_size": 2,
    }

    first = tasks.start_backfill.apply(kwargs={"request": request}).get()
    second = tasks.start_backfill.apply(kwargs=continued[0]).get()

    assert (first["status"], first["submitted"], first["read"]) == ("continued", 2, 2)
    assert (second["status"], second["submitted"], second["run_id"]) == (
        "finished",
        1,
        first["run_id"],
    )
    assert continued[0]["skip"] == 2
    assert len(queued_events(settings)) == 3


def test_the_celery_task_dead_letters_a_request_it_cannot_run(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks
    from worker.dlq import list_dead_letters

    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    request = {"source": {"kind": "jsonl", "path": "/nonexistent/events.jsonl"}}

    result = tasks.start_backfill.apply(kwargs={"request": request}).get()

    assert result["status"] == "rejected"
    letters = [d for d in list_dead_letters(settings, limit=100) if d.kind == "invalid_backfill"]
    assert "no such file: /nonexistent/events.jsonl" in letters[-1].reason


def test_the_commands_submit_with_a_progress_bar_and_show_the_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from schemas.settings import get_settings
    from worker.cli import app

    monkeypatch.setenv("ENRICH_DATABASE_URL", settings.database_url.get_secret_value())
    monkeypatch.setenv("ENRICH_BACKFILL_QUEUE", settings.backfill_queue)
    get_settings.cache_clear()
    events = [product_payload(product_id=f"p-{i}") for i in range(2)]
    source = write_events(tmp_path / "a.jsonl", events, "[]\n")
    runner = CliRunner()

    submitted = runner.invoke(
        app, ["backfill", "--from-jsonl", str(source), "--all", "--run-id", "cli", "--no-wait"]
    )
    shown = runner.invoke(app, ["status", "--run", "cli"])
    listed = runner.invoke(app, ["status", "--json"])
    get_settings.cache_clear()

    assert submitted.exit_code == 0, submitted.output
    assert "submitted 2 products in" in submitted.output
    assert "submitted 2  done 0  failed 0  pending 2" in shown.output
    assert "body: 1" in shown.output
    assert [run["run_id"] for run in json.loads(listed.output)["runs"]] == ["cli"]
    assert len(queued_events(settings)) == 2


def test_a_chunk_expands_into_one_enrich_product_task_per_product_with_its_event_id(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(5)]
    source = write_events(tmp_path / "a.jsonl", events)
    run_backfill(jsonl_request(source, run_id="x", products_per_message=3), settings)
    chunks = [json.loads(message.body)[1] for message in queued(settings)]

    results = [expand(settings, monkeypatch, chunk)[0] for chunk in chunks]

    messages = queued(settings)
    assert [len(chunk["events"]) for chunk in chunks] == [3, 2]
    assert [result["published"] for result in results] == [3, 2]
    assert [m.headers["task"] for m in messages] == [backfill.TASK_NAME] * 5
    bodies = [json.loads(m.body)[1]["event"] for m in messages]
    assert [e["product_id"] for e in bodies] == [f"p-{i}" for i in range(5)]
    for message, event in zip(messages, bodies, strict=True):
        assert event["event_id"] == str(event_id_for("x", event["product_id"]))
        assert message.headers["id"] == event["event_id"]
        assert message.delivery_info["routing_key"] == settings.backfill_queue


def test_a_redelivered_chunk_publishes_no_task_again(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(3)]
    run_backfill(jsonl_request(write_events(tmp_path / "a.jsonl", events), run_id="x"), settings)
    (message,) = queued(settings)
    chunk = json.loads(message.body)[1]
    first, _ = expand(settings, monkeypatch, chunk)
    published = queued_events(settings)

    again, _ = expand(settings, monkeypatch, chunk)

    assert (first["published"], first["already_expanded"]) == (3, 0)
    assert (again["published"], again["already_expanded"]) == (0, 3)
    assert queued(settings) == []
    assert sorted(e["event_id"] for e in published) == sorted(
        str(event_id_for("x", f"p-{i}")) for i in range(3)
    )
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        progress = run_progress(conn, "x")
    assert progress is not None and progress.submitted == 3


def test_a_chunk_expanded_before_the_client_recorded_it_counts_once(
    settings: Settings, tmp_path: Path
) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(2)]
    source = write_events(tmp_path / "a.jsonl", events)
    run_backfill(jsonl_request(source, run_id="x"), settings)
    url = settings.database_url.get_secret_value()
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM backfill_items WHERE run_id = 'x'")
    chunk = BackfillChunk.model_validate(json.loads(queued(settings)[0].body)[1])

    backfill.expand_chunk(chunk, settings)
    again = run_backfill(jsonl_request(source, run_id="x"), settings)

    with psycopg.connect(url) as conn:
        progress = run_progress(conn, "x")
    assert progress is not None and progress.submitted == 2
    assert (again.counts.already_submitted, again.counts.submitted) == (2, 0)


def test_the_rate_expands_one_slice_a_second_and_sends_the_rest_on(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [product_payload(product_id=f"p-{i}") for i in range(5)]
    source = write_events(tmp_path / "a.jsonl", events)
    run_backfill(jsonl_request(source, run_id="x", rate=2.0), settings)
    (message,) = queued(settings)
    chunk = json.loads(message.body)[1]

    slices = []
    while chunk is not None:
        result, sent_on = expand(settings, monkeypatch, chunk)
        slices.append((result["published"], [options["countdown"] for options in sent_on]))
        chunk = sent_on[0]["kwargs"] if sent_on else None

    assert slices == [(2, [1.0]), (2, [1.0]), (1, [])]
    assert [e["product_id"] for e in queued_events(settings)] == [f"p-{i}" for i in range(5)]
    assert sent_on == []


def test_a_chunk_without_event_ids_is_dead_lettered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.dlq import list_dead_letters

    result, _ = expand(settings, monkeypatch, {"run_id": "x", "events": [{"product_id": "p"}]})

    assert result["status"] == "rejected"
    letters = [d for d in list_dead_letters(settings, limit=100) if d.kind == "invalid_backfill"]
    assert "event 0 has no event_id UUID" in letters[-1].reason


def test_a_chunk_that_cannot_be_published_after_the_last_retry_is_dead_lettered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks
    from worker.dlq import list_dead_letters
    from worker.servers import free_port

    closed = settings.model_copy(
        update={"broker_url": SecretStr(f"amqp://guest:guest@127.0.0.1:{free_port()}//")}
    )
    monkeypatch.setattr(tasks, "get_settings", lambda: closed)
    event = {"product_id": "p", "event_id": str(event_id_for("x", "p"))}

    result = tasks.expand_backfill_chunk.apply(
        kwargs={"run_id": "x", "events": [event]}, retries=tasks.MAX_RETRIES
    ).get()

    assert result["status"] == "abandoned"
    letters = [
        d for d in list_dead_letters(settings, limit=100) if d.kind == "abandoned_backfill_chunk"
    ]
    assert "RabbitMQ does not answer" in letters[-1].reason


@pytest.mark.slow
def test_current_model_versions_are_the_loaded_models_versions(stack: LocalStack) -> None:
    from worker.models import current_model_versions, load_models

    computed = current_model_versions(stack.settings.models)

    assert computed == load_models(stack.settings.models).versions


@pytest.mark.slow
def test_a_worker_enriches_a_backfill_and_status_shows_it_done(
    stack: LocalStack,
    datasets: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.worker.running import events_for, validation_photos, wait_until
    from worker.backfill import print_status
    from worker.local import worker_process
    from worker.models import current_model_versions

    settings = stack.settings
    events = events_for(stack, validation_photos(datasets, 3))
    source = write_events(tmp_path / "catalog.jsonl", events, "{}\n")
    url = settings.database_url.get_secret_value()

    def progress() -> Any:
        with psycopg.connect(url) as conn:
            return run_progress(conn, "e2e")

    with worker_process(stack, tmp_path / "worker.log"):
        run_backfill(jsonl_request(source, BackfillMode.MISSING, run_id="e2e"), settings)
        finished = wait_until(lambda: progress().pending == 0, timeout_s=600, every_s=2)
    capsys.readouterr()
    print_status(settings, "e2e", as_json=True)
    status = json.loads(capsys.readouterr().out)
    stale = run_backfill(
        jsonl_request(source, BackfillMode.STALE, run_id="e2e-stale"),
        settings,
        versions=current_model_versions(settings.models),
    )

    assert finished, (tmp_path / "worker.log").read_text()[-3000:]
    assert (status["run"]["submitted"], status["run"]["done"]) == (3, 3)
    assert status["rejects"][0]["kind"] == "event_id"
    assert (stale.counts.submitted, stale.counts.not_selected) == (0, 3)
