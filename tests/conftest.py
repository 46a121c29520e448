"""Shared fixtures: a real RabbitMQ (ENRICH_BROKER_URL), and embedded Postgres with pgvector
and a SeaweedFS S3 server, both started here on 127.0.0.1 and stopped afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.settings import REPO_ROOT
from worker.local import BrokerUnreachable, LocalStack, local_stack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not (DATASETS / "ccp" / "photos").is_dir():
        pytest.fail(f"the shared datasets are missing: expected them at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("stack")
    try:
        with local_stack(root) as started:
            yield started
    except BrokerUnreachable as exc:
        pytest.fail(str(exc))
