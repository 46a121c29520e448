"""deploy/compose.yaml: valid against the Compose specification's schema, and a whole stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from schemas.settings import REPO_ROOT
from tests.settings_env import enrich_variables

COMPOSE = REPO_ROOT / "deploy" / "compose.yaml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"


def check_against_the_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema's own copy of the Compose specification's JSON Schema; no download."""
    command = [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return dict(loaded["services"])


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    result = check_against_the_compose_spec(COMPOSE)

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_misspelt_service_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))

    result = check_against_the_compose_spec(broken)

    assert result.returncode != 0
    assert "stop_grace_periods" in result.stdout


def test_the_stack_has_the_broker_database_s3_worker_query_service_and_flower() -> None:
    found = services()

    assert found["rabbitmq"]["image"].endswith("-management")
    assert found["postgres"]["image"].startswith("pgvector/pgvector:")
    assert found["s3"]["image"].startswith("chrislusf/seaweedfs:")
    assert found["worker"]["command"][0] == "worker"
    assert found["query"]["command"][0] == "serve"
    assert "flower" in found["flower"]["command"]


def test_every_dependency_waits_on_a_condition_its_service_can_meet() -> None:
    found = services()

    for name, service in found.items():
        for needed, rule in service.get("depends_on", {}).items():
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in found[needed], f"{name} waits on {needed}'s health"
            elif condition == "service_completed_successfully":
                assert found[needed].get("restart") == "no", f"{needed} must run once"


def test_the_workers_grace_period_outlasts_the_longest_batch() -> None:
    for name in ("worker", "worker-gpu"):
        service = services()[name]

        grace_s = seconds(service["stop_grace_period"])

        assert grace_s > float(service["environment"]["ENRICH_LIVENESS_STALL_S"])


def test_every_enrich_variable_is_a_real_setting_and_ports_stay_on_loopback() -> None:
    found = services()

    named = {key for s in found.values() for key in s.get("environment", {}) if "ENRICH_" in key}
    ports = [port for s in found.values() for port in s.get("ports", [])]

    assert named and named <= set(enrich_variables())
    assert ports and all(port.startswith("127.0.0.1:") for port in ports)
