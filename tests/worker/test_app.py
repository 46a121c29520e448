"""How a worker process starts, and stops when its models cannot load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from schemas.settings import REPO_ROOT
from worker.local import LocalStack


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_whose_models_cannot_load_stops_and_leaves_the_process_that_started_it(
    stack: LocalStack, pool: str
) -> None:
    env = {
        **os.environ,
        **stack.environment(),
        "ENRICH_MODELS__DEVICE": "tpu",
        "ENRICH_METRICS_PORT": "0",
        "ENRICH_LOG_JSON": "true",
    }
    worker = f"{sys.executable} -m worker.cli worker --pool={pool}"

    started = subprocess.run(
        ["bash", "-c", f"{worker}; echo starter-still-running"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert "worker_cannot_start" in started.stdout + started.stderr
    assert "ENRICH_MODELS__DEVICE=tpu" in started.stdout + started.stderr
    assert started.returncode == 0
    assert started.stdout.strip().endswith("starter-still-running")
