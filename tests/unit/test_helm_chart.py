"""The Helm chart, rendered and linted by the real helm binary, validated against Kubernetes 1.32.

No cluster: ``helm template`` is told the Kubernetes version and the Prometheus Operator's kinds
(helm_cli.py), ``kubernetes_validate`` holds the API schemas offline. Two value sets: the chart
defaults and an everything-on fixture. Other Kubernetes versions: test_helm_versions.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_cli import CHART, RenderFailed, ValuesRejected, lint, manifests, template
from prometheus_client import CollectorRegistry

from gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALL_ON = Path(__file__).parent / "fixtures" / "helm-values-all-on.yaml"
RELEASE, NAMESPACE = "gw", "llm"
FULLNAME = "gw-llm-gateway"
K8S_VERSION = "1.32"
CONFIG_PATH = "/etc/llmgw/config.yaml"

Manifest = dict[str, Any]


# ------------------------------------------------------------------------------------------ helpers


class HelmChart:
    """A chart directory rendered with the real helm (the name tests have always used)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def render(
        self,
        values: dict[str, Any] | None = None,
        *,
        name: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> list[Manifest]:
        text = template(values, chart=self.path, name=name, namespace=namespace, kube_version=K8S_VERSION)
        return [d for d in manifests(text) if d.get("kind")]


@pytest.fixture(scope="module")
def chart() -> Any:
    return HelmChart(CHART)


def _all_on_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_ON.read_text())


def render(chart: Any, values: dict[str, Any] | None = None) -> list[Manifest]:
    return chart.render(values)


def with_values(base: dict[str, Any] | None, **dotted: Any) -> dict[str, Any]:
    """Copy of ``base`` with dotted keys set, e.g. with_values(v, **{"gateway.server.workers": 2})."""
    values = copy.deepcopy(base or {})
    for key, value in dotted.items():
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return values


def one(docs: list[Manifest], kind: str, name: str = FULLNAME) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def gateway_container(docs: list[Manifest]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "gateway")


def rendered_config(docs: list[Manifest], name: str = FULLNAME) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", name)["data"]["config.yaml"])


def pod_specs(docs: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return out


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


VARIANTS: dict[str, Callable[[], dict[str, Any] | None]] = {"default": lambda: None, "all-on": _all_on_values}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, chart: Any) -> tuple[str, dict[str, Any] | None, list[Manifest]]:
    values = VARIANTS[request.param]()
    return request.param, values, render(chart, values)


# ------------------------------------------------------------------------------- lint and schemas


def test_lint_reports_no_warnings_or_errors(variant):
    _, values, _ = variant
    proc = lint(values, kube_version=K8S_VERSION, strict=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def _check_service_monitor(doc: Manifest) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"], "a ServiceMonitor needs a selector"
    assert spec["endpoints"], "a ServiceMonitor needs at least one endpoint"
    for ep in spec["endpoints"]:
        assert isinstance(ep["port"], str) and ep["path"] == "/metrics"
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", ep["interval"])


def _check_prometheus_rule(doc: Manifest) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    groups = doc["spec"]["groups"]
    assert groups
    for g in groups:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert isinstance(r["expr"], str) and r["expr"].strip()
            if "record" in r:  # recording rules (promtool checks them: test_alert_rules.py)
                assert set(r) == {"record", "expr"} and re.fullmatch(r"llmgw:[a-z_]+:[a-z_0-9]+", r["record"])
                continue
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"])
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert re.fullmatch(r"(\d+(ms|s|m|h))+", r["for"])
            assert all(isinstance(v, str) for v in r["labels"].values())
            assert r["expr"].count("(") == r["expr"].count(")")


CRD_CHECKS = {"ServiceMonitor": _check_service_monitor, "PrometheusRule": _check_prometheus_rule}


def test_every_manifest_is_valid_kubernetes(variant):
    _, _, docs = variant
    assert docs
    for doc in docs:
        check = CRD_CHECKS.get(doc["kind"])
        if check is not None:
            check(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE


def test_default_values_render_only_the_core(chart):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render(chart))
    assert kinds == sorted(
        [
            ("ConfigMap", FULLNAME),
            ("ConfigMap", f"{FULLNAME}-dashboard"),
            ("ConfigMap", f"{FULLNAME}-warmup-config"),
            ("Deployment", FULLNAME),
            ("Job", f"{FULLNAME}-warmup"),
            ("PodDisruptionBudget", FULLNAME),
            ("Pod", f"{FULLNAME}-test-readyz"),
            ("Service", FULLNAME),
            ("ServiceAccount", FULLNAME),
        ]
    )


def test_all_on_values_render_every_optional_resource(chart):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render(chart, _all_on_values())}
    assert {
        ("HorizontalPodAutoscaler", FULLNAME),
        ("ServiceMonitor", FULLNAME),
        ("PrometheusRule", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("Deployment", f"{FULLNAME}-redis"),
        ("Service", f"{FULLNAME}-redis"),
    } <= kinds


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": "three"}, "/replicaCount"),
        ({"replicas": 3}, "replicas"),
        ({"service": {"type": "Ingress"}}, "/service/type"),
        ({"lifecycle": {"preStopSleepSeconds": -1}}, "/lifecycle/preStopSleepSeconds"),
        ({"gateway": {"server": {"host": "127.0.0.1"}}}, "/gateway/server/host"),
        ({"gateway": {"server": {"port": 70000}}}, "/gateway/server/port"),
        ({"gateway": {"models": []}}, "/gateway/models"),
        (
            {
                "gateway": {
                    "models": [
                        {
                            "name": "m",
                            "deployments": [
                                {"id": "d", "base_url": "https://x/v1", "api_key": "sk-live-123"}
                            ],
                        }
                    ]
                }
            },
            "api_key",
        ),
        ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    ],
)
def test_schema_rejects_wrong_values(chart, values, where):
    with pytest.raises(ValuesRejected, match=re.escape(where)):
        chart.render(values)
    assert lint(values, strict=False).returncode != 0


# ------------------------------------------------------------------------------------ the pod


def test_probes_and_scrapes_use_the_admin_port_by_default(chart):
    # With keys on, the API port answers /metrics only with a key: Prometheus scrapes the admin port.
    values = with_values(None, **{"metrics.serviceMonitor.enabled": True})
    docs = render(chart, values)
    c = gateway_container(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "admin": 9090}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert rendered_config(docs)["server"]["admin_port"] == 9090
    assert [e["port"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["admin"]


def test_probes_target_the_gateway_endpoints_on_named_ports(chart):
    c = gateway_container(render(chart, with_values(None, **{"gateway.server.admin_port": None})))
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, (
        "start-up must outlast pool validation"
    )
    assert c["args"] == ["serve", "--config", CONFIG_PATH]
    svc = one(render(chart, with_values(None, **{"gateway.server.admin_port": None})), "Service")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", 8080, "http")]


def test_admin_port_carries_probes_and_metrics_when_configured(chart):
    docs = render(chart, _all_on_values())
    c = gateway_container(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "admin": 9090}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "admin"
    svc_ports = {p["name"]: p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]}
    assert svc_ports == {"http": "http", "admin": "admin"}
    assert [e["port"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["admin"]


def test_port_follows_the_gateway_config(chart):
    docs = render(chart, with_values(None, **{"gateway.server.port": 9000}))
    assert gateway_container(docs)["ports"][0]["containerPort"] == 9000
    assert rendered_config(docs)["server"]["port"] == 9000


@pytest.mark.parametrize(
    ("admin_port", "service_port", "probe_port"),
    [(9090, 9090, "admin"), (None, 8080, "http")],
    ids=["admin-port-default", "admin-port-null"],
)
def test_helm_test_pod_calls_readyz_where_it_is_served(chart, admin_port, service_port, probe_port):
    # With an admin listener the API port answers /readyz with 404: the test pod must use the admin port.
    docs = render(chart, with_values(None, **{"gateway.server.admin_port": admin_port}))
    assert rendered_config(docs)["server"].get("admin_port") == admin_port
    pod = one(docs, "Pod", f"{FULLNAME}-test-readyz")
    script = pod["spec"]["containers"][0]["command"][-1]
    url = re.search(r'url = "http://([^:/"]+):(\d+)(/[^"]*)"', script)
    assert url is not None, script
    assert (url[1], int(url[2]), url[3]) == (FULLNAME, service_port, "/readyz")
    svc_ports = {p["port"]: p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]}
    # The Service port leads to the container port the readiness probe checks /readyz on.
    assert svc_ports.get(service_port) == probe_port
    assert gateway_container(docs)["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": probe_port}


def test_every_container_is_locked_down(variant):
    _, _, docs = variant
    specs = pod_specs(docs)
    assert len(specs) >= 3
    for where, spec in specs:
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("runAsNonRoot", spec["securityContext"].get("runAsNonRoot")) is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where


def test_gateway_runs_as_the_image_user_with_writable_scratch_only(chart):
    docs = render(chart)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 10001
    mounts = {m["mountPath"]: m for m in gateway_container(docs)["volumeMounts"]}
    assert mounts["/etc/llmgw"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(gateway_container(docs)), (
        "one worker needs no multiprocess dir"
    )


def test_several_workers_get_a_writable_metrics_dir(chart):
    docs = render(chart, _all_on_values())
    c = gateway_container(docs)
    path = env_of(c)["PROMETHEUS_MULTIPROC_DIR"]["value"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert not mount.get("readOnly")


def test_pods_spread_across_zones_and_nodes(chart):
    dep = one(render(chart), "Deployment")
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert [s["topologyKey"] for s in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for s in spread:
        assert s["maxSkew"] == 1 and s["whenUnsatisfiable"] == "ScheduleAnyway"
        assert s["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_selectors_match_their_pods(variant):
    _, _, docs = variant
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    gateway = pods[FULLNAME]
    assert one(docs, "Deployment")["spec"]["selector"]["matchLabels"].items() <= gateway.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= gateway.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= gateway.items()
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for sm in monitors:
        svc = one(docs, "Service")
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    if f"{FULLNAME}-redis" in pods:
        assert not any(
            sm["spec"]["selector"]["matchLabels"].items()
            <= one(docs, "Service", f"{FULLNAME}-redis")["metadata"]["labels"].items()
            for sm in monitors
        )
        redis = pods[f"{FULLNAME}-redis"]
        assert one(docs, "Service", f"{FULLNAME}-redis")["spec"]["selector"].items() <= redis.items()
        assert not one(docs, "Service")["spec"]["selector"].items() <= redis.items(), (
            "gateway Service must not select Redis"
        )


# --------------------------------------------------------------------------- graceful termination


def test_grace_period_outlasts_prestop_and_drain(variant):
    _, _, docs = variant
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    cfg = rendered_config(docs)
    c = gateway_container(docs)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    prestop = float(re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2]).group(1))
    assert pod["terminationGracePeriodSeconds"] > prestop + cfg["server"]["drain_timeout_s"]


def test_grace_period_is_derived_from_prestop_drain_and_margin(chart):
    values = with_values(
        None,
        **{
            "lifecycle.preStopSleepSeconds": 7,
            "lifecycle.terminationMarginSeconds": 3,
            "gateway.server.drain_timeout_s": 90.5,
            "gateway.model_defaults.timeouts.total_ms": 90000,
        },
    )
    pod = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 7 + 91 + 3


def test_explicit_grace_period_shorter_than_prestop_plus_drain_fails(chart):
    values = with_values(None, **{"lifecycle.terminationGracePeriodSeconds": 30})
    with pytest.raises(RenderFailed, match="terminationGracePeriodSeconds"):
        render(chart, values)
    ok = with_values(None, **{"lifecycle.terminationGracePeriodSeconds": 120})
    assert (
        one(render(chart, ok), "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 120
    )


def test_drain_shorter_than_the_longest_request_fails_unless_allowed(chart):
    longer = with_values(None, **{"gateway.model_defaults.timeouts.total_ms": 600000})
    with pytest.raises(RenderFailed, match=r"drain_timeout_s .* longest request .*600 s"):
        render(chart, longer)
    # A deployment-level timeout counts too.
    per_deployment = _all_on_values()
    per_deployment["gateway"]["models"][1]["deployments"][0]["timeouts"] = {"total_ms": 200000}
    with pytest.raises(RenderFailed, match="200 s"):
        render(chart, per_deployment)
    allowed = with_values(longer, **{"lifecycle.allowDrainShorterThanRequests": True})
    assert one(render(chart, allowed), "Deployment")


# ------------------------------------------------------------------------------ config and secrets


def test_config_checksum_rolls_pods_only_when_the_config_changes(chart):
    base = render(chart)
    checksum = one(base, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    text = one(base, "ConfigMap")["data"]["config.yaml"]
    assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    changed = render(chart, with_values(None, **{"gateway.server.max_inflight": 500}))
    assert (
        one(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        != checksum
    )
    same = render(chart, {"replicaCount": 5})
    assert (
        one(same, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"] == checksum
    )


def test_provider_keys_come_from_the_secret_never_the_configmap(chart):
    docs = render(chart, _all_on_values())
    assert not [d for d in docs if d["kind"] == "Secret"]
    for name in (FULLNAME, f"{FULLNAME}-warmup-config"):
        cfg = rendered_config(docs, name)
        for m in cfg["models"]:
            for d in m["deployments"]:
                if "api_key" in d:
                    assert re.fullmatch(r"\$\{[A-Z_]+\}", d["api_key"]), d["api_key"]
    for _, spec in pod_specs(docs):
        for c in spec["containers"]:
            if c["name"] in ("gateway", "warmup"):
                assert {"secretRef": {"name": "llm-gateway-providers"}} in c["envFrom"]
                assert env_of(c)["AZURE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "azure-openai"


def test_a_literal_provider_key_is_refused_by_schema_and_template(chart, tmp_path):
    values = _all_on_values()
    values["gateway"]["models"][1]["deployments"][0]["api_key"] = "sk-live-0123456789"
    with pytest.raises(ValuesRejected, match="api_key"):
        render(chart, values)
    # Without the schema (helm --skip-schema-validation, or a fork that drops it) the template still refuses it.
    unchecked = tmp_path / "llm-gateway"
    shutil.copytree(CHART, unchecked)
    (unchecked / "values.schema.json").unlink()
    with pytest.raises(RenderFailed, match=r"models\[1\]\.deployments\[0\]\.api_key .* never puts"):
        render(HelmChart(unchecked), values)


def test_redis_url_is_merged_into_the_state_config(chart):
    trial = rendered_config(render(chart, with_values(None, **{"redis.enabled": True})))
    assert trial["state"] == {
        "backend": "redis",
        "redis_url": f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0",
        "key_prefix": "llmgw:",
    }
    url = "redis://:${REDIS_PASSWORD}@redis-master.redis.svc:6379/0"
    external = rendered_config(render(chart, with_values(None, **{"redis.url": url})))
    assert external["state"]["backend"] == "redis" and external["state"]["redis_url"] == url
    assert rendered_config(render(chart))["state"]["backend"] == "memory"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis.enabled": True, "redis.url": "redis://r:6379/0"}, "mutually exclusive"),
        ({"gateway.state.backend": "redis"}, "no Redis is named"),
    ],
)
def test_inconsistent_redis_values_fail(chart, values, message):
    with pytest.raises(RenderFailed, match=message):
        render(chart, with_values(None, **values))


def test_region_from_value_or_pod_annotation(chart):
    assert "GATEWAY_REGION" not in env_of(gateway_container(render(chart)))
    explicit = env_of(gateway_container(render(chart, {"region": "eu-west"})))
    assert explicit["GATEWAY_REGION"] == {"name": "GATEWAY_REGION", "value": "eu-west"}
    annotated = env_of(
        gateway_container(render(chart, {"regionFromAnnotation": "topology.kubernetes.io/region"}))
    )
    assert (
        annotated["GATEWAY_REGION"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.annotations['topology.kubernetes.io/region']"
    )


def _check_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_REGION"}
    env.update(OPENAI_API_KEY="sk-test", AZURE_API_KEY="az-test")
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rendered_config_passes_llmgw_check_config(variant, tmp_path):
    _, _, docs = variant
    text = one(docs, "ConfigMap")["data"]["config.yaml"]
    assert one(docs, "ConfigMap", f"{FULLNAME}-warmup-config")["data"]["config.yaml"] == text
    proc = _check_config(text, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config OK")
    assert "sk-test" not in proc.stdout and "az-test" not in proc.stdout


def test_the_gateway_answers_to_the_services_names_and_to_addresses(chart):
    """With auth.mode none the gateway refuses a request sent to a host name it does not list (DNS
    rebinding): in-cluster clients call it by the Service's names, which the chart lists; probes and
    Prometheus come by the pod's address, always allowed."""
    from gateway.api.headers import host_policy
    from gateway.config import parse_config

    svc = f"{FULLNAME}.{NAMESPACE}"
    default = rendered_config(render(chart))["server"]["allowed_hosts"]
    assert default == [FULLNAME, svc, f"{svc}.svc", f"{svc}.svc.cluster.local"]
    values = with_values(
        None, **{"clusterDomain": "corp.local", "gateway.server.allowed_hosts": ["llm.example.com"]}
    )
    cfg = parse_config(rendered_config(render(chart, values)), env={"OPENAI_API_KEY": "sk-test"})
    assert cfg.auth.mode == "none"
    policy = host_policy(cfg.server.allowed_hosts)
    assert policy is not None
    for host in (
        f"{FULLNAME}:8080",
        f"{svc}:8080",
        f"{svc}.svc:9090",
        f"{svc}.svc.corp.local:8080",
        "llm.example.com",
        "10.42.0.7:9090",
    ):
        assert policy.allows(host), host
    assert not policy.allows(f"{svc}.svc.cluster.local:8080") and not policy.allows("rebound.example:8080")


def test_default_values_leave_retries_to_the_gateway_defaults(chart):
    """The chart sets no retry policy of its own: a fixed max_retries there would override the gateway's
    budget-bounded default for every model."""
    from gateway.config import RetryConfig, parse_config

    raw = rendered_config(render(chart))
    assert "retry" not in raw.get("model_defaults", {})
    assert all("retry" not in m for m in raw["models"])
    cfg = parse_config(raw, env={"OPENAI_API_KEY": "sk-test"})
    assert all(m.retry == RetryConfig() for m in cfg.models)


# ---------------------------------------------------------------------------------- warm-up hook


def test_warmup_job_is_a_hook_with_the_new_config(chart):
    docs = render(chart, _all_on_values())
    job = one(docs, "Job", f"{FULLNAME}-warmup")
    hook_cm = one(docs, "ConfigMap", f"{FULLNAME}-warmup-config")
    for d in (job, hook_cm):
        ann = d["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == "post-install,pre-upgrade"
        assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    # The config is created before the Job that mounts it.
    assert int(hook_cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    c = spec["containers"][0]
    assert c["args"] == ["warmup", "--config", CONFIG_PATH, "--no-learned"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/llmgw")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == hook_cm["metadata"]["name"]
    assert hook_cm["data"] == one(docs, "ConfigMap")["data"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "warmup"
    assert c["image"] == gateway_container(docs)["image"]


def test_warmup_can_be_switched_off(chart):
    docs = render(chart, {"warmup": {"enabled": False}})
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-warmup", "-warmup-config"))]


# ------------------------------------------------------------------------- scaling and networking


def test_hpa_scales_on_cpu_and_inflight_and_owns_replicas(chart):
    docs = render(chart, _all_on_values())
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "llmgw_inflight_requests"
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert one(render(chart), "Deployment")["spec"]["replicas"] == 2


def test_network_policy_covers_gateway_and_warmup_pods(chart):
    docs = render(chart, _all_on_values())
    np = one(docs, "NetworkPolicy")["spec"]
    expr = np["podSelector"]["matchExpressions"][0]
    assert expr["key"] == "app.kubernetes.io/component" and set(expr["values"]) == {"gateway", "warmup"}
    # the API port, the admin port, the admin port again for helm's test pod (metricsFrom leaves it out)
    assert [p["port"] for rule in np["ingress"] for p in rule["ports"]] == ["http", "admin", "admin"]
    egress_ports = {p["port"] for rule in np["egress"] for p in rule["ports"]}
    assert {53, 443, 6379, 8000} <= egress_ports
    redis_rule = next(r for r in np["egress"] if any(p["port"] == 6379 for p in r["ports"]))
    assert redis_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"


def _admits(rule: Manifest, pod_labels: dict[str, str], port: str) -> bool:
    """Whether an ingress rule lets a pod of this release's namespace with these labels in on this port."""
    if port not in [p["port"] for p in rule["ports"]]:
        return False
    peers = rule.get("from")
    if not peers:
        return True
    return any(
        set(peer.get("podSelector", {}).get("matchLabels", {}).items()) <= set(pod_labels.items())
        and "namespaceSelector" not in peer
        and not peer.get("podSelector", {}).get("matchExpressions")
        for peer in peers
        if "podSelector" in peer
    )


MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
CLIENTS = [{"namespaceSelector": {"matchLabels": {"llm-gateway/client": "true"}}}]


@pytest.mark.parametrize(
    ("admin_port", "metrics_from", "ingress_from", "port", "rule_added"),
    [
        (9090, MONITORING, [], "admin", True),  # admin port limited to the monitoring namespace
        (None, [], CLIENTS, "http", True),  # no admin port: /readyz on the API port, limited to clients
        (9090, [], CLIENTS, "admin", False),  # the admin port admits any source: nothing to add
    ],
    ids=["admin-port-limited", "api-port-limited", "admin-port-open"],
)
def test_network_policy_lets_the_helm_test_pod_reach_readyz(
    chart, admin_port, metrics_from, ingress_from, port, rule_added
):
    values = with_values(
        None,
        **{
            "gateway.server.admin_port": admin_port,
            "networkPolicy.enabled": True,
            "networkPolicy.metricsFrom": metrics_from,
            "networkPolicy.ingressFrom": ingress_from,
        },
    )
    docs = render(chart, values)
    test_pod = one(docs, "Pod", f"{FULLNAME}-test-readyz")
    assert gateway_container(docs)["readinessProbe"]["httpGet"]["port"] == port  # where the test pod calls
    ingress = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert any(_admits(rule, test_pod["metadata"]["labels"], port) for rule in ingress)
    # The rule names the test pod by its labels, on that port only: no other pod of the release gets in.
    test_rules = [r for r in ingress if r.get("from") and _admits(r, test_pod["metadata"]["labels"], port)]
    assert len(test_rules) == (1 if rule_added else 0)
    for rule in test_rules:
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"] == [
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "llm-gateway",
                        "app.kubernetes.io/instance": RELEASE,
                        "app.kubernetes.io/component": "test",
                    }
                }
            }
        ]
    # Without helm's test pod there is nothing to let in.
    off = one(render(chart, with_values(values, **{"tests.enabled": False})), "NetworkPolicy")
    assert len(off["spec"]["ingress"]) == len(ingress) - len(test_rules)


# ------------------------------------------------------------------------- alerts and dashboard


def _exported_metric_names() -> set[str]:
    """Sample names the gateway really exports, from its own metric definitions."""
    registry = CollectorRegistry()
    Metrics(registry=registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        else:
            names.add(family.name)
    return names


def _metric_refs(expr: str) -> set[str]:
    return set(re.findall(r"\bllmgw_[a-z_]+\b", expr))


ISSUE_ALERTS = {
    "LLMGatewayTargetDown",
    "LLMGatewayAbsent",
    "LLMGatewayErrorBudgetFastBurn",
    "LLMGatewayErrorBudgetSlowBurn",
    "LLMGatewayTTFTBudgetFastBurn",
    "LLMGatewayTTFTBudgetSlowBurn",
    "LLMGatewayLatencyBudgetFastBurn",
    "LLMGatewayLatencyBudgetSlowBurn",
    "LLMGatewayNoHealthyUpstream",
    "LLMGatewayRetryBudgetExhausted",
    "LLMGatewayHedgeBudgetExhausted",
    "LLMGatewayDeploymentEjected",
    "LLMGatewayStateBackendDown",
    "LLMGatewayOverheadP99High",
    "LLMGatewayWarmupFailed",
    "LLMGatewayAccessLogDropped",
}


def _rules(docs: list[Manifest]) -> tuple[dict[str, Manifest], dict[str, Manifest]]:
    """(alerts by name, recording rules by name) of the release's PrometheusRule."""
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    return {r["alert"]: r for r in rules if "alert" in r}, {r["record"]: r for r in rules if "record" in r}


def _runbook_anchors() -> set[str]:
    """GitHub's anchors of docs/operations.md's headings."""
    text = (ROOT / "docs" / "operations.md").read_text()
    return {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }


def test_alerts_cover_the_issue_and_use_exported_metrics(chart, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    alerts, records = _rules(render(chart, _all_on_values()))
    assert set(alerts) == ISSUE_ALERTS
    exported = _exported_metric_names()
    anchors = _runbook_anchors()
    for name, r in records.items():
        refs = _metric_refs(r["expr"])
        assert refs and refs <= exported, f"{name} uses unknown metrics {refs - exported}"
        assert f'namespace="{NAMESPACE}", job="{FULLNAME}"' in r["expr"], name
    for name, r in alerts.items():
        refs = _metric_refs(r["expr"]) | set(re.findall(r"\bllmgw:[a-z_]+:[a-z_0-9]+", r["expr"]))
        assert refs <= exported | set(records), f"{name} uses unknown series {refs - exported - set(records)}"
        assert refs or re.search(r"\bup\{", r["expr"]), name  # the gateway's series, or Prometheus' own `up`
        assert f'namespace="{NAMESPACE}", job="{FULLNAME}"' in r["expr"], name
        assert r["labels"]["team"] == "platform"
        for text in r["annotations"].values():
            assert "{{ $" in text or "{{" not in text  # Prometheus templates survive Helm's
        url = r["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/operations.md") and url.split("#")[1] == name.lower(), url
        assert name.lower() in anchors, f"docs/operations.md has no runbook section for {name}"
    assert "{{ $labels.model }}" in alerts["LLMGatewayErrorBudgetFastBurn"]["annotations"]["summary"]


def test_state_backend_alert_only_with_a_shared_backend(chart):
    alone = with_values(None, **{"metrics.prometheusRule.enabled": True})
    assert "LLMGatewayStateBackendDown" not in _rules(render(chart, alone))[0]
    for shared in ({"redis.url": "redis://r:6379/0"}, {"redis.enabled": True}):
        alerts = _rules(render(chart, with_values(alone, **shared)))[0]
        assert 'backend!="memory"' in alerts["LLMGatewayStateBackendDown"]["expr"]


def test_slo_thresholds_are_latency_bucket_bounds():
    from prometheus_client.utils import floatToGoString

    from gateway.telemetry.metrics import LATENCY_BUCKETS

    schema = json.loads((CHART / "values.schema.json").read_text())
    slos = schema["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]["slos"]["properties"]
    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS]
    assert slos["ttft"]["properties"]["le"]["enum"] == bounds == slos["latency"]["properties"]["le"]["enum"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]["slos"]
    assert values["ttft"]["le"] in bounds and values["latency"]["le"] in bounds
    assert LATENCY_BUCKETS[-1] > 300, "the default 300 s deadline needs a bucket"


def test_monitoring_resources_only_where_their_crds_exist():
    values = _all_on_values()
    without = [d["kind"] for d in manifests(template(values, api_versions=()))]
    assert "ServiceMonitor" not in without and "PrometheusRule" not in without
    assert "Deployment" in without
    with_crds = [d["kind"] for d in manifests(template(values))]
    assert "ServiceMonitor" in with_crds and "PrometheusRule" in with_crds


def test_network_policy_lets_traces_out_to_the_collector(chart):
    base = _all_on_values()
    before = one(render(chart, base), "NetworkPolicy")["spec"]["egress"]

    def added_rules(**dotted: Any) -> list[Manifest]:
        egress = one(render(chart, with_values(base, **dotted)), "NetworkPolicy")["spec"]["egress"]
        extra = list(egress)
        for r in before:
            extra.remove(r)
        return extra

    assert added_rules(
        **{"gateway.tracing": {"otlp_endpoint": "http://otel-collector.observability:4318"}}
    ) == [{"ports": [{"port": 4318, "protocol": "TCP"}]}]
    assert added_rules(**{"gateway.tracing": {"otlp_endpoint": "https://otel.example.com"}}) == [
        {"ports": [{"port": 443, "protocol": "TCP"}]}
    ]
    # an endpoint set through OTEL_EXPORTER_OTLP_ENDPOINT in `env`: say so, and where the collector lives
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
    assert added_rules(**{"networkPolicy.egress.tracing": {"enabled": True, "port": 4317, "to": [peer]}}) == [
        {"ports": [{"port": 4317, "protocol": "TCP"}], "to": [peer]}
    ]


def test_dashboard_is_a_grafana_sidecar_configmap_over_exported_metrics(chart, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    cm = one(render(chart, _all_on_values()), "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    dash = json.loads(cm["data"]["llm-gateway.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    refs = set().union(*(_metric_refs(e) for e in exprs))
    exported = _exported_metric_names()
    assert refs <= exported, f"dashboard uses unknown metrics {refs - exported}"
    wanted = {
        "llmgw_requests_total",
        "llmgw_request_duration_seconds_bucket",
        "llmgw_ttft_seconds_bucket",
        "llmgw_upstream_duration_seconds_bucket",
        "llmgw_gateway_overhead_seconds_bucket",
        "llmgw_hedges_total",
        "llmgw_retries_total",
        "llmgw_ejections_total",
        "llmgw_pool_connections",
    }
    assert wanted <= refs
    titles = " ".join(p["title"] for p in dash["panels"])
    for word in (
        "P50 / P95 / P99",
        "Time to first token",
        "Upstream time vs gateway overhead",
        "Hedges",
        "Retries",
        "Ejections",
        "Pool connections",
    ):
        assert word in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------- docs/helm.md


def _install_walkthrough() -> str:
    text = (ROOT / "docs" / "helm.md").read_text()
    return text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]


def test_install_walkthrough_secret_carries_every_variable_the_values_use(chart):
    # Pods fail at start on an unset ${VAR}; step 3's check-config must not set one the Secret lacks.
    section = _install_walkthrough()
    secret_keys = set(re.findall(r"--from-literal=(\w+)=", section))
    values_text = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    used = set(re.findall(r"\$\{(\w+)\}", values_text))
    assert used and used <= secret_keys, f"the Secret lacks {sorted(used - secret_keys)}"
    check = re.search(r"^\s*((?:\w+=\S+ )+)llmgw check-config", section, re.M)
    assert check is not None
    assert {kv.split("=", 1)[0] for kv in check[1].split()} == secret_keys
    docs = render(chart, yaml.safe_load(textwrap.dedent(values_text)))
    assert rendered_config(docs)["models"][0]["name"] == "chat-default"
    # `yq` without -r prints a JSON-quoted string with the Python yq (Debian's), not the config.
    for line in section.splitlines():
        if "| yq " in line:
            assert "| yq -r " in line, line
