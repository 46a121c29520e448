"""The worker's metrics: what each record function counts, and multiprocess mode across a fork."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from schemas.settings import REPO_ROOT
from worker import health, metrics


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    """The record functions write to a registry of this test (single-process mode)."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.define(registry))
    yield registry


def test_enriched_failed_and_duplicate_enrichments_are_counted_apart(
    registry: CollectorRegistry,
) -> None:
    metrics.enrichment_finished("enriched", None, duplicate=False)
    metrics.enrichment_finished("failed", "unreadable_image", duplicate=False)
    metrics.enrichment_finished("failed", "unreadable_image", duplicate=False)
    metrics.enrichment_finished("enriched", None, duplicate=True)

    assert registry.get_sample_value("enrich_enrichments_done_total") == 1
    failed = registry.get_sample_value(
        "enrich_enrichments_failed_total", {"reason": "unreadable_image"}
    )
    assert failed == 2
    assert registry.get_sample_value("enrich_enrichments_duplicate_total") == 1


def test_queue_lag_is_measured_from_occurred_at_on_the_first_attempt_only(
    registry: CollectorRegistry,
) -> None:
    occurred_at = datetime.now(UTC) - timedelta(seconds=42)

    metrics.event_started(occurred_at, attempt=0)
    metrics.event_started(occurred_at, attempt=1)

    assert registry.get_sample_value("enrich_queue_lag_seconds_count") == 1
    lag = registry.get_sample_value("enrich_queue_lag_seconds_sum")
    assert lag is not None and 42 <= lag < 60


def test_stage_timings_in_milliseconds_are_recorded_in_seconds_per_stage(
    registry: CollectorRegistry,
) -> None:
    metrics.stage_finished("segmentation", 1500.0)
    metrics.stage_finished("tagging", 20.0)
    metrics.batch_started(3)

    segmentation = {"stage": "segmentation"}
    assert registry.get_sample_value("enrich_stage_seconds_sum", segmentation) == 1.5
    assert registry.get_sample_value("enrich_stage_seconds_count", {"stage": "tagging"}) == 1
    assert registry.get_sample_value("enrich_batch_images_sum") == 3


def test_a_model_load_is_timed_and_marks_the_process_loaded(registry: CollectorRegistry) -> None:
    with metrics.model_load_timer():
        pass

    assert registry.get_sample_value("enrich_model_load_seconds_count") == 1
    assert registry.get_sample_value("enrich_models_loaded") == 1


def test_prepare_moves_a_process_that_imported_prometheus_client_first_to_metric_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    for name in ("_metrics", "_folder", "_made_folder"):
        monkeypatch.setattr(metrics, name, getattr(metrics, name))

    folder = metrics.prepare(tmp_path / "metrics")
    metrics.enrichment_finished("failed", "stage_failed", duplicate=False)

    assert os.environ[metrics.MULTIPROC_ENV] == str(folder)
    assert list(folder.glob("counter_*.db"))
    (sample,) = health.merged_samples(folder, "enrich_enrichments_failed_total")
    assert (sample.labels, sample.value) == ({"reason": "stage_failed"}, 1.0)


FORKED_POOL_PROCESS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from worker import health, metrics

    folder = metrics.prepare(Path(sys.argv[1]))
    metrics.event_accepted()
    pid = os.fork()
    if pid == 0:
        with metrics.model_load_timer():
            pass
        metrics.enrichment_finished("enriched", None, duplicate=False)
        metrics.stage_finished("embedding", 250.0)
        os._exit(0)
    os.waitpid(pid, 0)

    def values(name):
        return [(s.labels, s.value) for s in health.merged_samples(folder, name)]

    seen = {
        "consumed": values("enrich_events_consumed_total"),
        "done": values("enrich_enrichments_done_total"),
        "embedding": values("enrich_stage_seconds_sum"),
        "loaded": values("enrich_models_loaded"),
    }
    metrics.process_exited(pid)
    seen["loaded_after_exit"] = values("enrich_models_loaded")
    print(json.dumps(seen))
    """
)


def test_values_recorded_in_a_forked_pool_process_reach_the_main_process(
    tmp_path: Path,
) -> None:
    script = ["-c", FORKED_POOL_PROCESS, str(tmp_path / "metrics")]

    run = subprocess.run(
        [sys.executable, *script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )

    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["consumed"] == [[{}, 1.0]]
    assert seen["done"] == [[{}, 1.0]]
    assert seen["embedding"] == [[{"stage": "embedding"}, 0.25]]
    assert seen["loaded"] == [[{}, 1.0]]
    assert seen["loaded_after_exit"] == [[{}, 0.0]]
