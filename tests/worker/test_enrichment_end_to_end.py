"""A real worker process against RabbitMQ, Postgres with pgvector and S3, on real photos."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from PIL import Image

from tests.schemas.test_events import product_payload
from tests.worker.running import json_lines
from worker.events import dead_letter_queue, publish_events
from worker.local import CompletionListener, LocalStack, worker_process
from worker.stores import database, objects
from worker.tasks import MAX_STARTS

pytestmark = pytest.mark.slow

BUCKET = "catalog-images"
JEANS_PHOTO = "0016.jpg"
"""A CCP photo whose pixel annotation holds jeans."""


@pytest.fixture(scope="module")
def s3(stack: LocalStack) -> objects.S3Client:
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, BUCKET)
    return client


@pytest.fixture(scope="module")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture(scope="module")
def listener(stack: LocalStack, worker_log: Path) -> Iterator[CompletionListener]:
    with CompletionListener(stack.settings) as listening, worker_process(stack, worker_log):
        yield listening
    print(worker_log.read_text()[-3000:])


def upload(s3: objects.S3Client, key: str, data: bytes) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def publish(stack: LocalStack, *bodies: str) -> None:
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        publish_events(connection, stack.settings, bodies)


def rows_of(stack: LocalStack, product_id: str) -> tuple[int, int]:
    """How many enrichments a product has, and how many image rows they hold together."""
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        counts = conn.execute(
            "SELECT count(DISTINCT e.enrichment_id), count(i.image_index) FROM enrichments e"
            " LEFT JOIN images i USING (enrichment_id) WHERE e.product_id = %s",
            (product_id,),
        ).fetchone()
    assert counts is not None
    return counts[0], counts[1]


def event_for(url: str, **changes: Any) -> dict[str, Any]:
    product_id = f"p-{uuid.uuid4().hex[:8]}"
    fields: dict[str, Any] = {"product_id": product_id, "images": [{"url": url}], **changes}
    return product_payload(**fields)


def completions_of(
    listener: CompletionListener, event: dict[str, Any], timeout_s: float = 180
) -> list[dict[str, Any]]:
    def mine(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for c in received if c["causation_id"] == event["event_id"]]

    listener.wait_until(lambda received: bool(mine(received)), timeout_s=timeout_s)
    listener.wait_until(lambda received: len(mine(received)) > 1, timeout_s=2)
    return mine(listener.received)


def dead_letters(stack: LocalStack, timeout_s: float = 30) -> list[tuple[dict[str, Any], bytes]]:
    """Everything parked so far, read raw (the body is kept as it arrived)."""
    found: list[tuple[dict[str, Any], bytes]] = []
    deadline = time.monotonic() + timeout_s
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        queue = dead_letter_queue(stack.settings)(connection.channel())
        queue.declare()
        while time.monotonic() < deadline:
            message = queue.get(no_ack=True, accept=["application/json"])
            if message is None:
                if found:
                    break
                time.sleep(0.5)
                continue
            body = message.body
            found.append(
                (dict(message.headers), body if isinstance(body, bytes) else body.encode())
            )
    return found


def test_an_event_ends_as_rows_mask_pngs_and_one_completion_event(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener, datasets: Path
) -> None:
    photo = datasets / "ccp" / "photos" / JEANS_PHOTO
    event = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))

    publish(stack, json.dumps(event))
    completions = completions_of(listener, event)

    assert len(completions) == 1
    done = completions[0]
    assert done["status"] == "enriched"
    assert done["embedding"]["dimension"] == 384
    image = done["images"][0]
    assert (image["width"], image["height"]) == Image.open(photo).size
    assert image["masks"], "the shipped segmenter found no garment in a street photo"
    for mask in image["masks"]:
        png = Image.open(io.BytesIO(objects.get_object(s3, mask["uri"], max_bytes=1 << 24)))
        assert png.mode == "L" and png.size == (image["width"], image["height"])
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        status, versions = conn.execute(
            "SELECT status, model_versions FROM enrichments WHERE event_id = %s",
            (event["event_id"],),
        ).fetchone()
        mask_uris = [
            r[0]
            for r in conn.execute(
                "SELECT m.uri FROM masks m JOIN enrichments e USING (enrichment_id)"
                " WHERE e.event_id = %s ORDER BY mask_index",
                (event["event_id"],),
            )
        ]
        dimension = conn.execute(
            "SELECT vector_dims(embedding) FROM embeddings WHERE product_id = %s"
            " AND space = 'text'",
            (event["product_id"],),
        ).fetchone()
    assert status == "enriched"
    assert versions == done["model_versions"]
    assert mask_uris == [mask["uri"] for mask in image["masks"]]
    assert dimension == (384,)


def test_invalid_json_and_a_schema_break_are_dead_lettered_and_the_next_event_completes(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener, datasets: Path
) -> None:
    photo = next((datasets / "clothing-small" / "validation" / "pants").glob("*.jpg"))
    broken_json = '{"event_type": "product.created", "product_id":'
    no_images = json.dumps(event_for("s3://catalog-images/y.jpg", images=[]))
    valid = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))

    publish(stack, broken_json, no_images, json.dumps(valid))
    completions = completions_of(listener, valid)
    parked = dead_letters(stack)

    assert [c["status"] for c in completions] == ["enriched"]
    reasons = {headers["x-error-reason"]: body for headers, body in parked}
    assert any(
        "'body'" in reason and body == broken_json.encode() for reason, body in reasons.items()
    )
    assert any("'images'" in reason and "at least 1" in reason for reason in reasons)
    # Other tests of the session park messages of their own kinds in the same queue.
    ours = [h for h, body in parked if body in (broken_json.encode(), no_images.encode())]
    assert len(ours) == 2
    assert all(h["x-error-kind"] == "invalid_event" for h in ours)


def test_a_rejected_event_is_logged_with_the_ids_it_carried(
    stack: LocalStack,
    s3: objects.S3Client,
    listener: CompletionListener,
    worker_log: Path,
    datasets: Path,
) -> None:
    photo = next((datasets / "clothing-small" / "validation" / "skirt").glob("*.jpg"))
    no_images = event_for("s3://catalog-images/z.jpg", images=[])
    valid = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))

    publish(stack, json.dumps(no_images), json.dumps(valid))
    completions_of(listener, valid)
    lines, _ = json_lines(worker_log)

    rejected = [
        line
        for line in lines
        if line.get("event") == "event_rejected" and line.get("event_id") == no_images["event_id"]
    ]
    assert len(rejected) == 1
    assert rejected[0]["product_id"] == no_images["product_id"]
    assert rejected[0]["field"] == "images"
    assert rejected[0]["level"] == "warning"


def test_an_unreadable_image_ends_as_a_failed_enrichment_with_its_reason(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener
) -> None:
    event = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", b"these bytes are no image"))

    publish(stack, json.dumps(event))
    completions = completions_of(listener, event)
    parked = dead_letters(stack)

    assert [c["status"] for c in completions] == ["failed"]
    assert "not a readable image" in completions[0]["reason"]
    assert any(
        h["x-error-kind"] == "unreadable_image"
        and json.loads(body)["event_id"] == event["event_id"]
        for h, body in parked
    )
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "SELECT status, error_kind, error_reason FROM enrichments WHERE event_id = %s",
            (event["event_id"],),
        ).fetchone()
    assert row[0] == "failed" and row[1] == "unreadable_image"
    assert "not a readable image" in row[2]


def test_an_event_that_keeps_killing_its_worker_is_dead_lettered_not_redelivered_forever(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener, datasets: Path
) -> None:
    photo = next((datasets / "clothing-small" / "validation" / "shorts").glob("*.jpg"))
    event = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))
    with database.connect(stack.settings.database_url.get_secret_value()) as conn:
        conn.execute(  # as if nine earlier deliveries had each died with their worker
            "INSERT INTO attempts (event_id, attempts) VALUES (%s, %s)",
            (event["event_id"], MAX_STARTS),
        )
        conn.commit()

    publish(stack, json.dumps(event))
    completions = completions_of(listener, event)
    parked = dead_letters(stack)

    assert [c["status"] for c in completions] == ["failed"]
    assert "started 10 times" in completions[0]["reason"]
    assert any(
        h["x-error-kind"] == "abandoned" and json.loads(body)["event_id"] == event["event_id"]
        for h, body in parked
    )


def test_a_product_published_again_unchanged_is_answered_from_its_first_enrichment(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener, datasets: Path
) -> None:
    photo = datasets / "ccp" / "photos" / JEANS_PHOTO
    event = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))
    again = {**event, "event_id": str(uuid.uuid4())}

    publish(stack, json.dumps(event))
    first = completions_of(listener, event)
    publish(stack, json.dumps(again))
    second = completions_of(listener, again)

    assert len(first) == 1 and len(second) == 1
    assert first[0]["reused_from"] is None
    assert second[0]["reused_from"] == event["event_id"]
    assert second[0]["images"] == first[0]["images"]
    assert rows_of(stack, event["product_id"]) == (2, 1)


def test_an_event_published_twice_writes_one_set_of_rows_and_one_completion_event(
    stack: LocalStack, s3: objects.S3Client, listener: CompletionListener, datasets: Path
) -> None:
    photo = next((datasets / "clothing-small" / "validation" / "dress").glob("*.jpg"))
    event = event_for(upload(s3, f"e2e/{uuid.uuid4().hex}.jpg", photo.read_bytes()))

    publish(stack, json.dumps(event), json.dumps(event))
    completions = completions_of(listener, event)
    listener.wait_until(lambda received: False, timeout_s=10)  # time for the duplicate

    assert len([c for c in listener.received if c["causation_id"] == event["event_id"]]) == 1
    assert completions[0]["status"] == "enriched"
    assert rows_of(stack, event["product_id"]) == (1, 1)
