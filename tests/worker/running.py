"""Helpers for tests that run a real worker process: photos in S3, events, HTTP, processes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu import Connection

from tests.schemas.test_events import product_payload
from worker.events import publish_events
from worker.local import LocalStack
from worker.stores import objects

BUCKET = "catalog-images"


def validation_photos(datasets: Path, count: int) -> list[Path]:
    """`count` photos of clothing-small's validation split, taken from every class in turn."""
    classes = sorted(p for p in (datasets / "clothing-small" / "validation").iterdir())
    per_class = [sorted(folder.glob("*.jpg")) for folder in classes]
    photos = [photo for row in zip(*per_class, strict=False) for photo in row]
    return photos[:count]


def events_for(stack: LocalStack, photos: list[Path]) -> list[dict[str, Any]]:
    """One product per photo, the photo uploaded to the stack's S3 first."""
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, BUCKET)
    events = []
    for photo in photos:
        key = f"running/{uuid.uuid4().hex}.jpg"
        client.put_object(Bucket=BUCKET, Key=key, Body=photo.read_bytes())
        product_id = f"p-{uuid.uuid4().hex[:8]}"
        events.append(
            product_payload(product_id=product_id, images=[{"url": f"s3://{BUCKET}/{key}"}])
        )
    return events


def publish(stack: LocalStack, events: list[dict[str, Any]]) -> None:
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        publish_events(connection, stack.settings, [json.dumps(event) for event in events])


def wait_until(done: Callable[[], bool], *, timeout_s: float, every_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(every_s)
    return done()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body; (0, b"") while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def json_lines(log_file: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The log's JSON objects, and the lines that are not JSON."""
    parsed, other = [], []
    for line in log_file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except ValueError:
            other.append(line)
    return parsed, other
