"""deploy/k8s: every manifest against the Kubernetes schemas, KEDA's objects against its CRD
models, and the promises the files make to each other (grace period, probes, secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

from schemas.settings import REPO_ROOT
from tests.settings_env import enrich_variables

K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
SECRET_KEYS = {"ENRICH_BROKER_URL", "ENRICH_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    paths = sorted(K8S.glob("*.yaml")) + sorted((K8S / "secrets").glob("*.yaml"))
    return [(f"{p.relative_to(K8S)}:{d['kind']}", d) for p in paths for d in documents(p)]


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in manifests() if d["kind"] == kind]
    found = [d for d in found if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def worker_container() -> dict[str, Any]:
    deployment = find("Deployment", "enrichment-worker")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


CORE = [(label, doc) for label, doc in manifests() if not doc["apiVersion"].startswith("keda.sh")]
KEDA = [(label, doc) for label, doc in manifests() if doc["apiVersion"].startswith("keda.sh")]


@pytest.mark.parametrize(("label", "doc"), CORE, ids=[label for label, _ in CORE])
def test_each_manifest_is_valid_against_the_kubernetes_schema_in_strict_mode(
    label: str, doc: dict[str, Any]
) -> None:
    validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    assert validated == "1.33"


def test_the_strict_schema_rejects_a_misspelt_field() -> None:
    deployment = find("Deployment", "enrichment-worker")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}

    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(("label", "doc"), KEDA, ids=[label for label, _ in KEDA])
def test_each_keda_object_matches_keda_s_crd_models_with_no_unknown_field(
    label: str, doc: dict[str, Any]
) -> None:
    model = getattr(keda, doc["kind"])

    parsed = model.model_validate(doc)

    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_the_worker_requests_a_gpu() -> None:
    resources = worker_container()["resources"]

    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == "1"


def test_the_grace_period_outlasts_the_longest_batch() -> None:
    pod = find("Deployment", "enrichment-worker")["spec"]["template"]["spec"]
    longest_batch_s = float(find("ConfigMap")["data"]["ENRICH_LIVENESS_STALL_S"])

    assert pod["terminationGracePeriodSeconds"] > longest_batch_s


def test_the_probes_ask_the_worker_s_health_endpoints_on_its_metrics_port() -> None:
    container = worker_container()
    port = int(find("ConfigMap")["data"]["ENRICH_METRICS_PORT"])

    (metrics_port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics_port["containerPort"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz/live", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz/live"


def test_configuration_and_secrets_are_kept_apart() -> None:
    config = find("ConfigMap")["data"]
    secret = find("Secret", "enrichment-secrets")["stringData"]
    sources = worker_container()["envFrom"]

    assert not SECRET_KEYS & set(config), "a secret setting is in the ConfigMap"
    assert set(secret) <= SECRET_KEYS
    assert {"ENRICH_BROKER_URL", "ENRICH_DATABASE_URL"} <= set(secret)
    assert {"configMapRef": {"name": "enrichment-config"}} in sources
    assert {"secretRef": {"name": "enrichment-secrets"}} in sources
    assert "env" not in worker_container(), "inline env would mix settings into the pod spec"


def test_every_enrich_variable_in_the_config_map_is_a_real_setting() -> None:
    config = find("ConfigMap")["data"]

    named = {key for key in config if key.startswith("ENRICH_")}

    assert named and named <= set(enrich_variables())


def test_the_disruption_budget_covers_the_worker_pods() -> None:
    budget = find("PodDisruptionBudget")["spec"]
    labels = find("Deployment", "enrichment-worker")["spec"]["template"]["metadata"]["labels"]

    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()


def test_keda_scales_the_worker_on_the_queues_it_consumes() -> None:
    scaled = find("ScaledObject")["spec"]
    config = find("ConfigMap")["data"]
    auth = find("TriggerAuthentication")["spec"]["secretTargetRef"]

    assert scaled["scaleTargetRef"]["name"] == "enrichment-worker"
    queues = {t["metadata"]["queueName"] for t in scaled["triggers"] if t["type"] == "rabbitmq"}
    assert queues == {
        config["ENRICH_TASK_QUEUE"],
        config["ENRICH_INTAKE_QUEUE"],
        config["ENRICH_BACKFILL_QUEUE"],
    }
    assert all(t["metadata"]["mode"] == "QueueLength" for t in scaled["triggers"])
    assert auth == [{"parameter": "host", "name": "enrichment-secrets", "key": "ENRICH_BROKER_URL"}]
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
