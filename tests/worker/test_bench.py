"""`enrich bench`: one small run through the real stages and a real threads-pool worker."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from schemas.settings import Settings
from worker.bench import BenchConfig, run_bench

pytestmark = pytest.mark.slow


def test_a_small_bench_reports_every_figure_consistently(
    datasets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENRICH_BATCH__MAX_SIZE", "2")
    monkeypatch.setenv("ENRICH_METRICS_PORT", "0")
    config = BenchConfig(datasets=datasets, events=4, photos=2, concurrency=2, warmup_events=1)

    result = run_bench(Settings(), config)

    assert set(result["stages"]) == {"segmentation", "tagging", "embedding"}
    for figures in result["stages"].values():
        assert figures["batch_size"] == 2 and figures["items"] == 2
        assert figures["batch_1_per_s"] > 0 and figures["batched_per_s"] > 0
        assert math.isclose(
            figures["ratio"], figures["batched_per_s"] / figures["batch_1_per_s"], rel_tol=0.01
        )
    worker = result["end_to_end"]
    assert worker["events"] == worker["completed"] == worker["enriched"] == 4
    assert worker["events_per_s"] > 0 and worker["peak_rss_mb"] > 100
    outside = worker["outside_models_ms"]
    assert outside["events"] == 4 and 0 < outside["median"] <= outside["p95"]
    assert math.isclose(
        result["end_to_end_ratio"],
        worker["events_per_s"] / result["stages_alone_events_per_s"],
        rel_tol=0.01,
    )
    assert result["settings"]["pool"] == "threads" and result["settings"]["batch_max_size"] == 2
