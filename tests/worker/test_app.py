"""How a worker process starts, and stops when its models cannot load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.settings import REPO_ROOT
from tests.worker.running import json_lines, wait_until
from worker.local import LocalStack
from worker.servers import free_port


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


@pytest.mark.slow
def test_a_worker_started_while_its_database_is_down_says_so_and_keeps_running(
    stack: LocalStack, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **stack.environment(),
        "ENRICH_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/enrichment",
        "ENRICH_METRICS_PORT": "0",
        "ENRICH_LOG_JSON": "true",
    }
    log_file = tmp_path / "worker.log"

    with log_file.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--pool=prefork"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        said = wait_until(
            lambda: "worker_started_without_servers" in log_file.read_text(), timeout_s=120
        )
        running = worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)

    lines, _ = json_lines(log_file)
    assert said and running
    (warning,) = [line for line in lines if line.get("event") == "worker_started_without_servers"]
    assert warning["level"] == "warning"
    assert "database" in warning["reason"]
    assert "Signal handler" not in log_file.read_text()
