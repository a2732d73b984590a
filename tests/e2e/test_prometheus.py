"""The chart's alerts in a real Prometheus scraping a real two-worker gateway while a provider fails and
recovers (a worker killed on the way): the alerts fire, then resolve, as Prometheus' own API reports them.

Prometheus (Debian's package, scripts/install-test-tools.sh) runs with a one-second scrape and rule
evaluation; the rules are the chart's PrometheusRule as the real helm renders it, with `for: 0s`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import HTTP, dep, free_port, model, priority_model, stop_process, wait_until, worker_pids

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "llm-gateway"
NAMESPACE, RELEASE = "llm", "gw"
JOB = f"{RELEASE}-llm-gateway"  # what the ServiceMonitor would name the job: the Service
QUICK = {"ttft_ms": 10, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 3, "tail_p": 0}
FAILING = {**QUICK, "error_rate": 1.0, "error_status": 503}


def _tool(name: str) -> str:
    found = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install-test-tools.sh")
    return found


def _chart_rules(tmp: Path) -> Path:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "alerts": {
                    "ejection": {"enabled": True, "for": "0s", "severity": "warning"},
                    "noHealthyUpstream": {"enabled": True, "for": "0s", "severity": "critical"},
                },
            }
        }
    }
    (tmp / "values.yaml").write_text(yaml.safe_dump(values))
    out = subprocess.run(
        [
            _tool("helm"),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--values",
            str(tmp / "values.yaml"),
            "--api-versions",
            "monitoring.coreos.com/v1/PrometheusRule",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (rule,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule"]
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


class Prometheus:
    def __init__(self, tmp: Path, target: str, rules: Path) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": f"{JOB}-0"}}
                    ],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                "--log.level=warn",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self._log,
            stderr=self._log,
        )
        self.tmp = tmp
        self.wait("ready", lambda: self._ready(), 30)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("prometheus exited: " + (self.tmp / "prometheus.log").read_text()[-2000:])
        try:
            return HTTP.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def alerts(self, name: str) -> list[dict[str, Any]]:
        data = HTTP.get(self.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in data if a["labels"]["alertname"] == name]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return HTTP.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()["data"][
            "result"
        ]

    @staticmethod
    def wait(what: str, cond: Any, timeout: float = 30.0) -> Any:
        # Prometheus' view changes once a second (scrape and rule evaluation): no use asking more often
        return wait_until(what, cond, timeout, every=0.2)

    def stop(self) -> None:
        stop_process(self.proc, 15)
        self._log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def make(target: str) -> Prometheus:
        p = Prometheus(tmp_path, target, _chart_rules(tmp_path))
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def _firing(prom: Prometheus, name: str, **labels: str) -> bool:
    return any(a["state"] == "firing" and labels.items() <= a["labels"].items() for a in prom.alerts(name))


def test_alerts_fire_while_a_provider_fails_and_resolve_when_it_recovers(
    sims_factory, gateways, prometheus_for
):
    sims = sims_factory(
        {"sim-a": ("us-east", FAILING), "sim-b": ("us-east", QUICK), "sim-c": ("us-east", FAILING)}
    )
    # ejections repeat while the loop below runs: max_ejection_s keeps each one short all the same
    outlier = {
        "consecutive_failures": 2,
        "base_ejection_s": 4,
        "max_ejection_s": 5,
        "max_ejection_percent": 100,
    }
    gw = gateways(
        {
            "models": [
                priority_model(
                    "chat",
                    [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                    outlier=outlier,
                    retry={
                        "max_retries": 1,
                        "budget_percent": 100,
                        "backoff_base_ms": 1,
                        "backoff_max_ms": 1,
                    },
                ),
                model("solo", [dep("c", sims.base_url("sim-c"))], outlier=outlier, retry={"max_retries": 0}),
            ]
        },
        workers=2,
    )
    prom = prometheus_for(gw.admin_url.removeprefix("http://"))
    prom.wait("the first scrape", lambda: prom.query(f'up{{job="{JOB}"}} == 1'))
    assert prom.query(f'llmgw_state_backend_up{{job="{JOB}", backend="memory"}} == 1')
    assert not prom.alerts("LLMGatewayStateBackendDown") and not prom.alerts("LLMGatewayTargetDown")

    def fail_until_ejected() -> bool:
        # either worker may take a request; each ejects on its own second consecutive failure
        for name in ("chat", "solo"):
            HTTP.post(
                gw.url + "/v1/chat/completions",
                timeout=30,
                json={"model": name, "messages": [{"role": "user", "content": "x"}]},
            )
        return _firing(prom, "LLMGatewayDeploymentEjected", model="chat", deployment="a") and _firing(
            prom, "LLMGatewayNoHealthyUpstream", model="solo"
        )

    prom.wait("the ejection and no-healthy-upstream alerts to fire", fail_until_ejected)
    assert not _firing(prom, "LLMGatewayNoHealthyUpstream", model="chat")  # b still serves chat
    # a worker dies mid-incident: its replacement starts clean, its gauges leave the pod's merged view
    victim = worker_pids(gw.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    prom.wait("a replacement worker", lambda: len(w := worker_pids(gw.proc.pid)) == 2 and victim not in w)
    sims.set("sim-a", error_rate=0.0)
    sims.set("sim-c", error_rate=0.0)
    # no request needed: ejections end with time, the gauges follow, and the alerts resolve
    prom.wait(
        "both alerts to resolve",
        lambda: (
            not prom.alerts("LLMGatewayDeploymentEjected") and not prom.alerts("LLMGatewayNoHealthyUpstream")
        ),
        timeout=40,
    )
    assert prom.query(f'max(llmgw_deployment_ejected{{job="{JOB}"}}) == 0')
    assert prom.query(f'min(llmgw_model_healthy_deployments{{job="{JOB}", model="solo"}}) == 1')
    # in flight: back to 0 and staying there (the killed worker's requests do not linger); waited for, as the
    # alerts can resolve less than 5 s after the last request was scraped in flight on a busy machine
    prom.wait(
        "no request in flight for 5 s",
        lambda: prom.query(f'max_over_time(llmgw_inflight_requests{{job="{JOB}"}}[5s]) == 0'),
    )
    assert not prom.alerts("LLMGatewayTargetDown")  # the pod kept answering scrapes throughout
