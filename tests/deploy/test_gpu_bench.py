"""deploy/gpu-bench.sh: the script for the device tool parses and tells what it lacks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from schemas.settings import REPO_ROOT

SCRIPT = REPO_ROOT / "deploy" / "gpu-bench.sh"


def test_the_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr


def test_without_a_mode_it_names_its_modes_and_exits_2() -> None:
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)

    assert done.returncode == 2
    assert "pack|parts|check|run" in done.stderr


def test_run_names_the_parts_that_were_not_carried_and_stops(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "deploy").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "deploy")
    env = {"PATH": "/usr/bin:/bin", "DEVICE_SITE": str(tmp_path / "site"), "OUT": str(tmp_path)}

    done = subprocess.run(
        ["bash", "deploy/gpu-bench.sh", "run"],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=env,
    )

    assert done.returncode == 1
    assert "missing: var/device/bundle/wheels" in done.stderr
    assert "var/device/minilm-2/part-2" in done.stderr
