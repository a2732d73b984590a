"""The chart on every Kubernetes minor version it supports (Chart.yaml's kubeVersion), with the real helm:
`helm lint --strict`, then `helm template` with everything on, each manifest validated against that
version's API schemas (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_cli import CHART, lint, manifests, template

ALL_ON = Path(__file__).parent / "fixtures" / "helm-values-all-on.yaml"
# From Chart.yaml's kubeVersion (>= 1.27) to the newest schemas kubernetes-validate ships.
VERSIONS = ("1.27", "1.28", "1.29", "1.30", "1.31", "1.32", "1.33", "1.34", "1.35")
CRD_KINDS = {
    "ServiceMonitor",
    "PrometheusRule",
}  # no schema in the Kubernetes API: test_helm_chart.py checks them


def _all_on() -> dict[str, Any]:
    values = yaml.safe_load(ALL_ON.read_text())
    values["gateway"]["tracing"] = {"otlp_endpoint": "http://otel-collector.observability:4318"}
    return values


def test_supported_versions_start_at_the_charts_minimum():
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == f">={VERSIONS[0]}.0-0"


@pytest.mark.parametrize("version", VERSIONS)
def test_lint_and_render_validate_on(version):
    values = _all_on()
    proc = lint(values, kube_version=version, strict=True)
    assert proc.returncode == 0 and "[WARNING]" not in proc.stdout, proc.stdout + proc.stderr
    docs = [d for d in manifests(template(values, kube_version=version)) if d.get("kind")]
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        *CRD_KINDS,
    }
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "gw-llm-gateway"]
    # PreferClose is asked for; only clusters where the field is on by default (1.31+) get it
    has_field = tuple(int(p) for p in version.split(".")) >= (1, 31)
    assert ("trafficDistribution" in svc["spec"]) == has_field, version


def test_the_oldest_version_refuses_what_the_newest_renders():
    """The version check above is real: 1.30's strict schema knows the field only behind a gate, 1.29's not at all."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "trafficDistribution": "PreferClose"},
    }
    kubernetes_validate.validate(svc, "1.31", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, "1.29", strict=True)
