"""The Helm chart's Redis topologies: Bitnami's Sentinel layout (sentinel service, master set name) and
a Redis Cluster seed, rendered into the gateway config that `llmgw check-config` accepts."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helm_cli import CHART, RenderFailed, ValuesRejected
from test_helm_chart import HelmChart, _check_config, one, render, rendered_config, with_values


@pytest.fixture(scope="module")
def chart() -> Any:
    return HelmChart(CHART)


SENTINEL = {
    "redis.mode": "sentinel",
    "redis.url": "redis://:${REDIS_PASSWORD}@redis/0",
    "redis.sentinel.hosts": ["redis.redis.svc.cluster.local:26379"],
    "redis.sentinel.password": "${REDIS_PASSWORD}",
}


def test_sentinel_values_render_the_bitnami_layout(chart, tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "pw")
    docs = render(chart, with_values(None, **SENTINEL, **{"networkPolicy.enabled": True}))
    state = rendered_config(docs)["state"]
    assert state == {
        "backend": "redis",
        "redis_mode": "sentinel",
        "redis_url": "redis://:${REDIS_PASSWORD}@redis/0",
        "sentinels": ["redis.redis.svc.cluster.local:26379"],
        "sentinel_master": "mymaster",
        "sentinel_password": "${REDIS_PASSWORD}",
        "key_prefix": "llmgw:",
    }
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    assert any({"port": 26379, "protocol": "TCP"} in rule.get("ports", []) for rule in egress)
    proc = _check_config(one(docs, "ConfigMap")["data"]["config.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_cluster_values_render_a_seed_node(chart, tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "pw")
    url = "redis://:${REDIS_PASSWORD}@redis-cluster.redis.svc:6379/0"
    docs = render(chart, with_values(None, **{"redis.mode": "cluster", "redis.url": url}))
    state = rendered_config(docs)["state"]
    assert state["backend"] == "redis" and state["redis_mode"] == "cluster" and state["redis_url"] == url
    assert "sentinels" not in state
    proc = _check_config(one(docs, "ConfigMap")["data"]["config.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis.mode": "sentinel"}, "redis.sentinel.hosts"),
        ({"redis.mode": "cluster"}, "seed node"),
        ({"redis.mode": "cluster", "redis.enabled": True}, "in-chart trial Redis"),
    ],
)
def test_inconsistent_topology_values_fail(chart, values: dict[str, Any], message):
    with pytest.raises(RenderFailed, match=message):
        render(chart, with_values(None, **values))


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({**SENTINEL, "redis.sentinel.password": "literal-password"}, "/redis/sentinel/password"),
        ({"redis.mode": "ring"}, "/redis/mode"),
        ({**SENTINEL, "redis.sentinel.hosts": ["no-port"]}, "/redis/sentinel/hosts/0"),
    ],
)
def test_schema_rejects_wrong_topology_values(chart, values: dict[str, Any], where):
    with pytest.raises(ValuesRejected, match=re.escape(where)):
        render(chart, with_values(None, **values))
