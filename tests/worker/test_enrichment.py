"""The not-recomputed path of worker/enrichment.py: real models, Postgres, S3 and RabbitMQ.

The stages are wrapped to count their calls; everything else is what the worker runs.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kombu import Connection, Producer

from schemas.events import ProductCreated
from tests.schemas.test_events import product_payload
from worker.enrichment import Enrichment, Resources, commit, enrich
from worker.local import CompletionListener, LocalStack
from worker.models import Models, load_models
from worker.stores import objects
from worker.stores.fetch import ImageFetcher

BUCKET = "catalog-images"
COUNTED = {"segmenter": "segment", "tagger": "tag_and_embed", "embedder": "embed"}


@pytest.fixture(scope="module")
def models(stack: LocalStack) -> Models:
    torch.set_num_threads(2)
    return load_models(stack.settings.models)


@pytest.fixture(scope="module")
def s3(stack: LocalStack) -> objects.S3Client:
    client = objects.make_client(stack.settings.s3)
    objects.ensure_bucket(client, BUCKET)
    objects.ensure_bucket(client, stack.settings.s3.mask_bucket)
    return client


@pytest.fixture
def calls() -> Counter[str]:
    return Counter()


@pytest.fixture
def resources(
    stack: LocalStack, models: Models, s3: objects.S3Client, calls: Counter[str]
) -> Resources:
    settings = stack.settings
    return Resources(
        settings=settings,
        models=counting(models, calls),
        s3_client=s3,
        fetcher=ImageFetcher(s3, settings.s3, settings.images),
    )


@pytest.fixture
def listener(stack: LocalStack) -> Iterator[CompletionListener]:
    with CompletionListener(stack.settings) as listening:
        yield listening


@pytest.fixture
def producer(stack: LocalStack) -> Iterator[Producer]:
    with Connection(stack.settings.broker_url.get_secret_value()) as connection:
        yield Producer(connection.channel())


def counting(models: Models, calls: Counter[str]) -> Models:
    """`models` whose model calls are counted in `calls`, by stage field name."""
    replaced: dict[str, Any] = {}
    for name, method in COUNTED.items():
        stage = copy.copy(getattr(models, name))
        original = getattr(stage, method)

        def call(values: Any, _original: Any = original, _name: str = name) -> Any:
            calls[_name] += 1
            return _original(values)

        setattr(stage, method, call)
        replaced[name] = stage
    return Models(**{**models.__dict__, **replaced})


def product_event(image_urls: list[str], **changes: Any) -> ProductCreated:
    images = [{"url": url} for url in image_urls]
    return ProductCreated.model_validate(product_payload(images=images, **changes))


def upload(s3: objects.S3Client, photo: Path) -> str:
    key = f"enrichment/{uuid.uuid4().hex}.jpg"
    s3.put_object(Bucket=BUCKET, Key=key, Body=photo.read_bytes())
    return f"s3://{BUCKET}/{key}"


def photos(datasets: Path, *classes: str) -> list[Path]:
    root = datasets / "clothing-small" / "validation"
    return [sorted((root / name).glob("*.jpg"))[0] for name in classes]


def run(event: ProductCreated, resources: Resources, producer: Producer) -> tuple[Enrichment, bool]:
    enrichment = enrich(event, resources)
    written = commit(enrichment, resources, producer)
    return enrichment, written


def mask_keys(s3: objects.S3Client, bucket: str, product_id: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"masks/{product_id}/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def mine(listener: CompletionListener, *events: ProductCreated) -> list[dict[str, Any]]:
    ids = {str(event.event_id) for event in events}
    listener.wait_until(
        lambda got: len([c for c in got if c["causation_id"] in ids]) >= len(ids), timeout_s=30
    )
    listener.wait_until(lambda got: False, timeout_s=1)  # anything sent twice arrives too
    return [c for c in listener.received if c["causation_id"] in ids]


def result_counts(resources: Resources, product_id: str) -> tuple[int, ...]:
    with resources.database() as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM enrichments WHERE product_id = %(p)s),"
            " (SELECT count(*) FROM images i JOIN enrichments e USING (enrichment_id)"
            "  WHERE e.product_id = %(p)s),"
            " (SELECT count(*) FROM masks m JOIN enrichments e USING (enrichment_id)"
            "  WHERE e.product_id = %(p)s),"
            " (SELECT count(*) FROM image_embeddings m JOIN enrichments e USING (enrichment_id)"
            "  WHERE e.product_id = %(p)s)",
            {"p": product_id},
        ).fetchone()
        conn.commit()
    assert row is not None
    return tuple(row)


@pytest.fixture
def first(s3: objects.S3Client, datasets: Path) -> ProductCreated:
    street, pants = datasets / "ccp" / "photos" / "0016.jpg", photos(datasets, "pants")[0]
    urls = [upload(s3, street), upload(s3, pants)]
    return product_event(urls, product_id=f"p-{uuid.uuid4().hex[:8]}")


def test_the_same_product_under_a_new_event_id_runs_no_model_and_points_at_the_first_results(
    first: ProductCreated,
    resources: Resources,
    producer: Producer,
    listener: CompletionListener,
    s3: objects.S3Client,
    calls: Counter[str],
) -> None:
    second = first.model_copy(update={"event_id": uuid.uuid4()})
    bucket = resources.settings.s3.mask_bucket

    computed, first_written = run(first, resources, producer)
    keys_after_first = mask_keys(s3, bucket, first.product_id)
    reused, second_written = run(second, resources, producer)
    completions = {c["causation_id"]: c for c in mine(listener, first, second)}

    print(
        f"\nenrichment computed in {computed.timings_ms['total']:.0f} ms, "
        f"reused in {reused.timings_ms['total']:.0f} ms "
        f"({computed.timings_ms['total'] / max(reused.timings_ms['total'], 0.1):.0f}x)"
    )
    assert first_written and second_written
    assert calls == {"segmenter": 1, "tagger": 1, "embedder": 1}
    assert keys_after_first, "the shipped segmenter found no garment in a street photo"
    assert mask_keys(s3, bucket, first.product_id) == keys_after_first
    assert len(completions) == 2
    original, repeat = completions[str(first.event_id)], completions[str(second.event_id)]
    assert original["reused_from"] is None
    assert repeat["reused_from"] == str(first.event_id)
    assert repeat["images"] == original["images"]
    assert repeat["model_versions"] == original["model_versions"]
    assert result_counts(resources, first.product_id) == (2, 2, len(keys_after_first), 2)


def test_a_redelivered_event_runs_no_model_and_sends_no_second_completion_event(
    first: ProductCreated,
    resources: Resources,
    producer: Producer,
    listener: CompletionListener,
    calls: Counter[str],
) -> None:
    run(first, resources, producer)
    counts = result_counts(resources, first.product_id)
    calls.clear()

    _, written = run(first, resources, producer)

    assert not written
    assert calls == {}
    assert len(mine(listener, first)) == 1
    assert result_counts(resources, first.product_id) == counts


@pytest.mark.parametrize("change", ["image", "title"])
def test_a_changed_image_or_text_is_enriched_again(
    first: ProductCreated,
    resources: Resources,
    producer: Producer,
    listener: CompletionListener,
    s3: objects.S3Client,
    datasets: Path,
    calls: Counter[str],
    change: str,
) -> None:
    changed: dict[str, Any]
    if change == "image":
        shirt = upload(s3, photos(datasets, "shirt")[0])
        changed = {"images": [first.images[0], first.images[1].model_copy(update={"url": shirt})]}
    else:
        changed = {"title": first.title + " in black"}
    second = first.model_copy(update={"event_id": uuid.uuid4(), **changed})

    run(first, resources, producer)
    enrichment, written = run(second, resources, producer)

    assert written
    assert calls == {"segmenter": 2, "tagger": 2, "embedder": 2}
    assert enrichment.completed.reused_from is None
    assert result_counts(resources, first.product_id)[:2] == (2, 4)


def test_a_changed_model_version_is_enriched_again(
    first: ProductCreated,
    resources: Resources,
    producer: Producer,
    calls: Counter[str],
) -> None:
    embedder = copy.copy(resources.models.embedder)
    embedder.model_version = "retrained@000000000000"
    retrained = Resources(
        settings=resources.settings,
        models=Models(**{**resources.models.__dict__, "embedder": embedder}),
        s3_client=resources.s3_client,
        fetcher=resources.fetcher,
    )
    second = first.model_copy(update={"event_id": uuid.uuid4()})

    run(first, resources, producer)
    enrichment, written = run(second, retrained, producer)

    assert written
    assert calls == {"segmenter": 2, "tagger": 2, "embedder": 2}
    assert enrichment.completed.reused_from is None
    assert enrichment.completed.model_versions.embedding == "retrained@000000000000"


def test_image_embeddings_are_unit_rows_per_photo_and_the_product_vector_in_the_image_space(
    first: ProductCreated, resources: Resources, producer: Producer
) -> None:
    enrichment, _ = run(first, resources, producer)

    with resources.database() as conn:
        per_image = conn.execute(
            "SELECT i.image_index, i.model_version, vector_norm(i.embedding)"
            " FROM image_embeddings i JOIN enrichments e USING (enrichment_id)"
            " WHERE e.event_id = %s ORDER BY i.image_index",
            (first.event_id,),
        ).fetchall()
        product = conn.execute(
            "SELECT model_version, dimension, vector_norm(embedding) FROM embeddings"
            " WHERE product_id = %s AND space = 'image'",
            (first.product_id,),
        ).fetchone()
        conn.commit()

    version = resources.models.image_embedder.model_version
    assert enrichment.completed.model_versions.image_embedding == version
    assert [(row[0], row[1]) for row in per_image] == [(0, version), (1, version)]
    assert all(row[2] == pytest.approx(1.0, abs=1e-4) for row in per_image)
    assert product is not None
    assert product[:2] == (version, 1280) and product[2] == pytest.approx(1.0, abs=1e-4)
