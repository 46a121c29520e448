"""`enrich bench stages`: each model stage alone on real product photos, in this process.

Images or texts per second at batch size 1 and at the configured batch size
(`ENRICH_BATCH__MAX_SIZE`), with the precision the worker uses, the best of three passes
after an untimed one. It needs the models and the photos only: no broker, database or S3
server, so it runs on a GPU machine that holds nothing but the model libraries
(deploy/gpu-bench.sh). `enrich bench` (worker.bench) runs it before the whole worker.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from handlers.base import RGBImage, Stage
from handlers.embedding import product_text
from handlers.segmentation import resolve_device
from schemas.settings import Settings
from worker.batching import precision
from worker.models import Models, load_models
from worker.stores.images import decode_image

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BenchProduct:
    title: str
    description: str
    attributes: list[str]
    photo: Path

    @property
    def text(self) -> str:
        return product_text(self.title, self.description, self.attributes)

    def pixels(self, max_pixels: int) -> RGBImage:
        """The photo as the worker decodes it."""
        return decode_image(str(self.photo), self.photo.read_bytes(), max_pixels=max_pixels).pixels


def run_stages_bench(settings: Settings, products: Sequence[BenchProduct]) -> dict[str, Any]:
    """The stages' figures on `products`, with the machine and the settings."""
    if not products:
        raise ValueError("the stages need at least one product photo")
    device = resolve_device(settings.models.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    stages = measure_stages(settings, products, settings.batch.max_size)

    alone_s = sum(1 / stage["batched_per_s"] for stage in stages.values())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "machine": machine(settings),
        "gpu_peak_memory_mb": None if peak is None else round(peak / 2**20, 1),
        "settings": {
            "batch_max_size": settings.batch.max_size,
            "mixed_precision": settings.batch.mixed_precision,
            "full_precision_stages": [str(stage) for stage in settings.batch.full_precision_stages],
            "photos": len(products),
        },
        "stages": stages,
        "stages_alone_events_per_s": round(1 / alone_s, 4),
    }


def bench_products(datasets: Path, count: int) -> list[BenchProduct]:
    """`count` product photos from clothing-small's validation split, every class in turn."""
    root = datasets / "clothing-small" / "validation"
    if not root.is_dir():
        raise FileNotFoundError(f"no product photos at {root}; expected clothing-small there")
    per_class = [sorted(folder.glob("*.jpg")) for folder in sorted(root.iterdir())]
    photos = [photo for row in zip(*per_class, strict=False) for photo in row][:count]

    products = []
    for photo in photos:
        kind = photo.parent.name.replace("-", " ")
        title = f"Classic {kind}"
        description = f"A {kind} on a plain background, as listed in a shop."
        products.append(BenchProduct(title, description, [kind], photo))
    return products


def measure_stages(
    settings: Settings, products: Sequence[BenchProduct], batch_size: int
) -> dict[str, dict[str, Any]]:
    """Items per second of each stage at batch size 1 and at `batch_size`, and the ratio."""
    models = load_models(settings.models)
    device = resolve_device(settings.models.device)
    pixels = [product.pixels(settings.images.max_pixels) for product in products]
    texts = [product.text for product in products]

    figures = {}
    for stage, unit, call, items in _stage_calls(models, pixels, texts):
        with precision(device, mixed=settings.batch.mixed_for(Stage(stage))):
            single, batched = _best_items_per_s(call, items, (1, batch_size))
        figures[stage] = {
            "unit": unit,
            "items": len(items),
            "batch_size": batch_size,
            "batch_1_per_s": round(single, 3),
            "batched_per_s": round(batched, 3),
            "ratio": round(batched / single, 3),
        }
        log.info("stage_benchmarked", stage=stage, **figures[stage])

    del models
    gc.collect()
    return figures


def _stage_calls(
    models: Models, pixels: list[Any], texts: list[str]
) -> list[tuple[str, str, Callable[[list[Any]], Any], list[Any]]]:
    """The calls `worker.enrichment` makes per event: the tagger's single forward pass gives
    tags and image embeddings where it has `tag_and_embed`."""
    tagger = models.tagger
    tag = getattr(tagger, "tag_and_embed", None) or tagger.tag
    return [
        (str(Stage.SEGMENTATION), "images", models.segmenter.segment, pixels),
        (str(Stage.TAGGING), "images", tag, pixels),
        (str(Stage.EMBEDDING), "texts", models.embedder.embed, texts),
    ]


STAGE_ROUNDS = 3


def _best_items_per_s(
    call: Callable[[list[Any]], Any], items: list[Any], batch_sizes: tuple[int, ...]
) -> list[float]:
    """Items per second over `items` at each batch size: the best of `STAGE_ROUNDS` passes,
    the sizes taking turns, after one untimed pass each. The first pass over new input
    shapes is slower (kernel choices are cached per shape), and on a shared machine the
    best pass is the one least disturbed; taking turns spreads any disturbance over both."""
    passes = {size: _batches(items, size) for size in batch_sizes}
    for batches in passes.values():
        _timed_pass(call, batches)

    best = dict.fromkeys(batch_sizes, 0.0)
    for _ in range(STAGE_ROUNDS):
        for size, batches in passes.items():
            best[size] = max(best[size], len(items) / _timed_pass(call, batches))
    return [best[size] for size in batch_sizes]


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _timed_pass(call: Callable[[list[Any]], Any], batches: list[list[Any]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        call(batch)
    return time.perf_counter() - started


def machine(settings: Settings) -> dict[str, Any]:
    device = resolve_device(settings.models.device)
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
