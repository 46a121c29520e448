"""deploy/docker: hadolint finds nothing, and both images run the worker as the project pins it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from schemas.settings import REPO_ROOT

DOCKER = REPO_ROOT / "deploy" / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    command = [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def pinned(package: str) -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [r for r in project["dependencies"] if r.startswith(f"{package}==")]
    return requirement.split("==")[1]


def test_there_is_a_gpu_and_a_cpu_image() -> None:
    names = {path.name for path in DOCKERFILES}

    assert names == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_hadolint_finds_nothing(path: Path) -> None:
    result = hadolint(path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_report_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get install curl\nCMD enrich worker\n")

    result = hadolint(careless)

    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_each_image_installs_the_torch_pair_the_project_pins(path: Path) -> None:
    text = path.read_text()

    assert f"ARG TORCH_VERSION={pinned('torch')}" in text
    assert f"ARG TORCHVISION_VERSION={pinned('torchvision')}" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_sigterm_reaches_the_worker_through_tini_in_exec_form(path: Path) -> None:
    text = path.read_text()

    assert 'ENTRYPOINT ["tini", "--", "enrich"]' in text
    assert 'CMD ["worker"]' in text
    assert re.search(r"^USER 10001$", text, re.MULTILINE)


def test_the_gpu_image_stands_on_a_cuda_runtime_and_builds_detectron2_only_when_asked() -> None:
    text = (DOCKER / "Dockerfile.gpu").read_text()

    assert re.search(r"^ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-", text, re.M)
    assert "ARG DETECTRON2=false" in text
    assert re.search(r"^FROM \$\{CUDA_DEVEL_IMAGE\} AS detectron2-true$", text, re.M)
    assert re.search(r"^FROM detectron2-\$\{DETECTRON2\} AS detectron2$", text, re.M)
    source = re.search(
        r"git\+https://github\.com/facebookresearch/detectron2\.git@\$\{(\w+)\}", text
    )
    assert source is not None
    assert re.search(rf"^ARG {source.group(1)}=[0-9a-f]{{40}}$", text, re.M)
