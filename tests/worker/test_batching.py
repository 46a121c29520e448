"""Batches across events: shared batches, per-item failures, time limits, the real models."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from schemas.settings import BatchSettings, get_settings
from worker.batching import Batcher, BatchTimeout, batched_models, precision, time_limit
from worker.errors import TransientFault
from worker.models import Models, load_models
from worker.precision import compare_precision
from worker.stores.images import decode_image


class Recorder:
    """A stage call that doubles numbers and remembers each batch it was given."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.delay_s = delay_s

    def __call__(self, values: list[Any]) -> list[Any]:
        self.batches.append(list(values))
        time.sleep(self.delay_s)
        if "bad" in values:
            raise ValueError("bad item")
        return [value * 2 for value in values]


def call_together(batcher: Batcher, inputs: list[list[Any]]) -> list[Any]:
    """Each input from its own thread, all at once; results or exceptions, in order."""

    def one(values: list[Any]) -> Any:
        try:
            return batcher(values)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(one, inputs))


def test_items_of_concurrent_callers_share_batches_and_each_caller_gets_its_own_rows() -> None:
    recorder = Recorder()
    batcher = Batcher("double", recorder, max_size=4, max_wait_s=0.5)

    results = call_together(batcher, [[index] for index in range(8)])

    assert results == [[index * 2] for index in range(8)]
    assert max(len(batch) for batch in recorder.batches) == 4
    assert len(recorder.batches) < 8
    batcher.close()


def test_a_lone_item_runs_once_the_wait_is_over() -> None:
    recorder = Recorder()
    batcher = Batcher("double", recorder, max_size=8, max_wait_s=0.05)

    result = batcher([21])

    assert result == [42]
    assert recorder.batches == [[21]]
    batcher.close()


def test_a_batch_runs_without_waiting_once_every_running_task_has_queued_its_items() -> None:
    recorder = Recorder()
    batcher = Batcher("double", recorder, max_size=8, max_wait_s=600)
    done = threading.Event()
    results: list[Any] = []

    def task() -> None:
        with time_limit(900):
            results.append(batcher([1, 2]))
        done.set()

    threading.Thread(target=task, daemon=True).start()
    finished = done.wait(timeout=60)

    assert finished, "the lone task's batch waited for callers that cannot come"
    assert results == [[2, 4]]
    batcher.close()


def test_a_bad_item_fails_only_its_own_caller() -> None:
    recorder = Recorder()
    batcher = Batcher("double", recorder, max_size=4, max_wait_s=0.5)

    results = call_together(batcher, [[1], ["bad"], [3], [4]])

    assert results[0] == [2] and results[2] == [6] and results[3] == [8]
    assert isinstance(results[1], ValueError)
    assert [len(batch) for batch in recorder.batches].count(1) >= 3, "items run again alone"
    batcher.close()


def test_a_caller_still_waiting_at_its_time_limit_gets_a_transient_fault() -> None:
    batcher = Batcher("slow", Recorder(delay_s=1.0), max_size=1, max_wait_s=0.0)
    batcher([1])  # the model thread runs

    with time_limit(0.2), pytest.raises(BatchTimeout) as raised:
        batcher([2, 3])

    assert isinstance(raised.value, TransientFault)
    assert "ENRICH_BATCH__TASK_TIME_LIMIT_S" in str(raised.value)
    batcher.close()


def test_tuple_outputs_are_split_per_item_and_joined_per_caller() -> None:
    def tag_and_embed(values: list[int]) -> tuple[list[str], np.ndarray]:
        return [f"tag-{v}" for v in values], np.array([[v, -v] for v in values], dtype=np.float32)

    batcher = Batcher("tag_and_embed", tag_and_embed, max_size=8, max_wait_s=0.3)

    results = call_together(batcher, [[1, 2], [3]])

    (tags_a, rows_a), (tags_b, rows_b) = results
    assert tags_a == ["tag-1", "tag-2"] and tags_b == ["tag-3"]
    assert rows_a.shape == (2, 2) and rows_b.tolist() == [[3.0, -3.0]]
    batcher.close()


def test_the_defaults_fit_below_rabbitmqs_consumer_timeout() -> None:
    settings = BatchSettings()

    assert settings.longest_unacked_s() < settings.consumer_timeout_s


def test_a_time_limit_that_would_outlast_the_consumer_timeout_is_refused() -> None:
    with pytest.raises(ValidationError) as raised:
        BatchSettings(task_time_limit_s=1600, consumer_timeout_s=1800)

    message = str(raised.value)
    assert "ENRICH_BATCH__TASK_TIME_LIMIT_S 1600" in message
    assert "ENRICH_BATCH__CONSUMER_TIMEOUT_S 1800" in message


def test_a_wait_longer_than_the_time_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="ENRICH_BATCH__MAX_WAIT_MS"):
        BatchSettings(max_wait_ms=5000, task_time_limit_s=4)


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    torch.set_num_threads(2)
    yield load_models(get_settings().models)


@pytest.fixture(scope="module")
def pixels(datasets: Path) -> list[Any]:
    root = datasets / "clothing-small" / "validation"
    photos = [sorted(folder.glob("*.jpg"))[0] for folder in sorted(root.iterdir())][:4]
    return [decode_image(str(p), p.read_bytes(), max_pixels=40_000_000).pixels for p in photos]


def test_batched_stages_share_the_weights_and_give_each_product_its_own_results(
    models: Models, pixels: list[Any]
) -> None:
    texts = [f"Classic garment number {index}." for index in range(len(pixels))]
    settings = BatchSettings(max_size=4, max_wait_ms=300)
    batched, batchers = batched_models(models, settings, device=torch.device("cpu"))

    def product(index: int) -> tuple[Any, Any, Any]:
        image = [pixels[index]]
        return (
            batched.segmenter.segment(image)[0],
            batched.tagger.tag(image)[0],
            batched.embedder.embed([texts[index]])[0],
        )

    with ThreadPoolExecutor(len(pixels)) as pool:
        results = list(pool.map(product, range(len(pixels))))

    alone_tags = models.tagger.tag(pixels)
    alone_embeddings = models.embedder.embed(texts)
    assert batched.tagger._learner is models.tagger._learner
    assert batched.embedder._model is models.embedder._model
    assert {"segmenter.segment", "tagger.tag", "embedder.embed"} <= {b.name for b in batchers}
    for (segmentation, tags, embedding), tags_alone, embedding_alone in zip(
        results, alone_tags, alone_embeddings, strict=True
    ):
        assert segmentation.num_masks == len(segmentation.pred_classes)
        assert [label.label for label in tags.labels] == [
            label.label for label in tags_alone.labels
        ]
        np.testing.assert_allclose(embedding, embedding_alone, atol=1e-4)
    for batcher in batchers:
        batcher.close()


def test_bfloat16_autocast_on_cpu_gives_embeddings_close_to_float32(models: Models) -> None:
    texts = ["Classic denim jeans, slim fit.", "A red summer dress with short sleeves."]
    full = models.embedder.embed(texts)

    with precision(torch.device("cpu"), mixed=True, cpu_dtype=torch.bfloat16):
        mixed = models.embedder.embed(texts)

    assert mixed.dtype == np.float32
    cosines = (full * mixed).sum(axis=1)
    assert cosines.min() > 0.99


def test_mixed_precision_is_off_on_cpu_unless_asked_for() -> None:
    context = precision(torch.device("cpu"), mixed=True)

    with context:
        dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    assert dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_on_cuda_matches_float32_on_the_same_photos(pixels: list[Any]) -> None:
    settings = get_settings().models.model_copy(update={"device": "cuda"})
    models = load_models(settings)
    texts = [f"Classic garment number {index}." for index in range(len(pixels))]
    cuda = torch.device("cuda")

    report = compare_precision(models, pixels, texts, lambda: precision(cuda, mixed=True))

    print(report)
    kept_float32 = set(BatchSettings().full_precision_stages)
    assert set(report["full_precision_stages"]) <= kept_float32, (
        "float16 moves these stages' results: add them to the default full_precision_stages"
    )


def test_each_task_thread_gets_its_own_database_connection(stack: Any) -> None:
    from worker.enrichment import Resources
    from worker.stores import objects
    from worker.stores.fetch import ImageFetcher

    settings = stack.settings
    client = objects.make_client(settings.s3)
    resources = Resources(
        settings=settings,
        models=None,  # type: ignore[arg-type]
        s3_client=client,
        fetcher=ImageFetcher(client, settings.s3, settings.images),
    )
    seen: list[int] = []
    barrier = threading.Barrier(2)

    def backend_pid() -> None:
        with resources.database() as conn:
            barrier.wait(timeout=30)
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            seen.append(int(row[0]))

    threads = [threading.Thread(target=backend_pid) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with resources.database() as conn:
        again = conn.execute("SELECT pg_backend_pid()").fetchone()

    assert len(set(seen)) == 2
    assert again is not None and again[0] not in seen
