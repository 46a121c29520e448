"""`enrich demo`: real photos through the whole worker on local servers, then a table."""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from kombu import Connection

from schemas.events import EventType, ProductCreated, ProductImage
from schemas.settings import REPO_ROOT, Settings
from worker.events import publish_events
from worker.local import CompletionListener, LocalStack, local_stack, worker_process
from worker.stores import objects

log = structlog.get_logger(__name__)

IMAGE_BUCKET = "catalog-images"
_JEANS = 25
_NOT_GARMENTS = {
    "null",
    "skin",
    "hair",
    "accessories",
    "bag",
    "purse",
    "glasses",
    "sunglasses",
    "necklace",
    "bracelet",
    "earrings",
    "ring",
    "watch",
    "belt",
}


def demo_products(data: Path, count: int) -> list[tuple[ProductCreated, Path]]:
    """Half street photos (CCP validation photos, those with jeans first), half product
    photos (clothing-small, one per class in turn)."""
    street = [_street_product(ccp, image_id) for ccp, image_id in _street_photos(data, count // 2)]

    shop: list[tuple[ProductCreated, Path]] = []
    folders = sorted(p for p in (data / "clothing-small" / "validation").iterdir() if p.is_dir())
    for round_index in range(count):
        for folder in folders:
            if len(street) + len(shop) >= count:
                return street + shop
            photo = sorted(folder.glob("*.jpg"))[round_index]
            kind = folder.name.replace("-", " ")
            shop.append(
                _product(
                    f"shop-{folder.name}-{round_index}",
                    f"Classic {kind}",
                    f"A {kind} on a plain background, as listed in a shop.",
                    [kind],
                    photo,
                )
            )
    return street + shop


def _street_photos(data: Path, count: int) -> list[tuple[Path, int]]:
    from handlers.training.ccp import load_pixel_mask, split_pixel_annotated

    ccp = data / "ccp"
    validation = split_pixel_annotated(ccp).validation
    with_jeans = [i for i in validation if (load_pixel_mask(ccp, i) == _JEANS).any()]
    others = [i for i in validation if i not in with_jeans]
    return [(ccp, image_id) for image_id in (with_jeans + others)[:count]]


def _street_product(ccp: Path, image_id: int) -> tuple[ProductCreated, Path]:
    """Titled by the garment that covers most pixels; the annotated classes are attributes."""
    from handlers.training.ccp import load_label_names, load_pixel_mask, photo_path

    names = load_label_names(ccp)
    counts = Counter(names[i] for i in load_pixel_mask(ccp, image_id).flat)
    garments = [name for name, _ in counts.most_common() if name not in _NOT_GARMENTS]
    main = garments[0] if garments else "outfit"
    return _product(
        f"ccp-{image_id:04d}",
        f"Street look with {main}",
        f"An outfit photographed outdoors: {', '.join(garments)}.",
        garments,
        photo_path(ccp, image_id),
    )


def _product(
    product_id: str, title: str, description: str, attributes: list[str], photo: Path
) -> tuple[ProductCreated, Path]:
    event = ProductCreated(
        event_id=uuid.uuid4(),
        event_type=EventType.PRODUCT_CREATED,
        schema_version=1,
        occurred_at=datetime.now(UTC),
        product_id=product_id,
        title=title,
        description=description,
        attributes=attributes,
        images=[ProductImage(url=f"s3://{IMAGE_BUCKET}/{product_id}/{photo.name}")],
    )
    return event, photo


def run_demo(data: Path, *, products: int, keep_servers: bool) -> int:
    started = time.monotonic()
    out = REPO_ROOT / "out" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    chosen = demo_products(data, products)

    with local_stack(REPO_ROOT / "var" / "demo") as stack:
        _upload_photos(stack, chosen)
        with (
            worker_process(stack, out / "worker.log") as worker,
            CompletionListener(stack.settings) as listener,
        ):
            _publish(stack.settings, [event for event, _ in chosen])
            completions = listener.wait_until(
                lambda got: len(got) >= len(chosen) or worker.poll() is not None,
                timeout_s=60 + 20 * len(chosen),
            )
            if worker.poll() is not None:
                print(f"the worker exited with code {worker.returncode}; see {out}/worker.log")

        _print_table(chosen, completions)
        _print_stage_times(completions)
        _print_similarity(stack, chosen)
        _render(stack, completions, out)

        enriched = sum(1 for c in completions if c["status"] == "enriched")
        failed = sum(1 for c in completions if c["status"] == "failed")
        elapsed = time.monotonic() - started
        print(f"enriched {enriched}/{len(chosen)} products ({failed} failed) in {elapsed:.0f} s")
        if keep_servers:
            _print_environment(stack)
            wait_for_stop()

    return 0 if enriched == len(chosen) else 1


def wait_for_stop() -> None:
    """Until Enter on a terminal; without one (nohup, a service, a pipe) until SIGTERM or
    SIGINT, so that kept servers are not stopped at once by an empty standard input."""
    if sys.stdin is not None and sys.stdin.isatty():
        input("servers are running; press Enter to stop them ")
        return

    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in signals}
    print(f"servers are running; stop them with: kill {os.getpid()}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _upload_photos(stack: LocalStack, chosen: list[tuple[ProductCreated, Path]]) -> None:
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, IMAGE_BUCKET)
    for event, photo in chosen:
        _, key = objects.split_s3_url(event.images[0].url)
        client.put_object(
            Bucket=IMAGE_BUCKET, Key=key, Body=photo.read_bytes(), ContentType="image/jpeg"
        )


def _publish(settings: Settings, events: list[ProductCreated]) -> None:
    with Connection(settings.broker_url.get_secret_value()) as connection:
        publish_events(connection, settings, [event.model_dump_json() for event in events])


def _print_table(
    chosen: list[tuple[ProductCreated, Path]], completions: list[dict[str, Any]]
) -> None:
    by_product = {c["product_id"]: c for c in completions}
    print(f"\n{'product':<22} {'status':<9} {'masks':<28} {'top labels':<34} {'dim':>4} {'ms':>6}")
    for event, _ in chosen:
        done = by_product.get(event.product_id)
        if done is None:
            print(f"{event.product_id:<22} {'missing':<9}")
            continue
        if done["status"] == "failed":
            print(f"{event.product_id:<22} {'failed':<9} {done['reason']}")
            continue
        image = done["images"][0] if done["images"] else {"masks": [], "labels": []}
        masks = Counter(mask["label"] for mask in image["masks"])
        mask_text = ", ".join(f"{n}x{label}" for label, n in masks.most_common(3)) or "-"
        labels = ", ".join(f"{x['label']} {x['score']:.2f}" for x in image["labels"][:3]) or "-"
        dim = done["embedding"]["dimension"] if done["embedding"] else "-"
        total = done["timings_ms"].get("total", 0.0)
        print(
            f"{event.product_id:<22} {done['status']:<9} {mask_text[:28]:<28} "
            f"{labels[:34]:<34} {dim:>4} {total:>6.0f}"
        )


def _print_stage_times(completions: list[dict[str, Any]]) -> None:
    """Median milliseconds per stage over the enriched products (one image each here)."""
    enriched = [c["timings_ms"] for c in completions if c["status"] == "enriched"]
    if not enriched:
        return
    stages = ("fetch", "segmentation", "tagging", "embedding", "masks", "total")
    medians = {s: statistics.median(t.get(s, 0.0) for t in enriched) for s in stages}
    print("\nmedian ms per product: " + ", ".join(f"{s} {v:.0f}" for s, v in medians.items()))


def _print_similarity(stack: LocalStack, chosen: list[tuple[ProductCreated, Path]]) -> None:
    from schemas.queries import SimilarityQuery, Space
    from worker.similarity import similar_to_product
    from worker.stores import database

    target = chosen[0][0]
    for space in Space:
        with database.connect(stack.settings.database_url.get_secret_value()) as conn:
            similar = similar_to_product(conn, target.product_id, SimilarityQuery(k=3, space=space))
        print(f"\nproducts most similar to {target.product_id} ({target.title!r}), by {space}:")
        for item in similar:
            print(f"  {item.product_id:<22} {item.title:<32} cosine distance {item.distance:.3f}")


def _render(stack: LocalStack, completions: list[dict[str, Any]], out: Path) -> None:
    from worker.show import render_product

    for done in [c for c in completions if c["status"] == "enriched"][:3]:
        path = out / f"{done['product_id']}.png"
        try:
            render_product(stack.settings, done["product_id"], path)
        except Exception as exc:  # a drawing is a bonus; the summary must still come
            log.warning("drawing_failed", product_id=done["product_id"], reason=repr(exc))
            continue
        print(f"drew {path}")


def _print_environment(stack: LocalStack) -> None:
    for name, value in stack.environment().items():
        print(f"export {name}={value}")
