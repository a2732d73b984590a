"""What an SRE reads off a running gateway stays true under faults and several workers: state gauges go
back when the state does, a killed worker stops counting, every worker logs JSON, a failed start fails.

Real processes: `llmgw serve` (one or two workers), simulated providers, real Redis, promtool.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from harness import (
    HTTP,
    REDIS_URL,
    dep,
    free_port,
    metric_value,
    model,
    post_chat,
    priority_model,
    wait_until,
    worker_pids,
)

QUICK = {"ttft_ms": 10, "ttft_dist": "fixed", "itl_ms": 2, "tokens": 3, "tail_p": 0}
FAILING = {**QUICK, "error_rate": 1.0, "error_status": 503}


def _scrape(gw: Any) -> str:
    # a connection of its own each time: a kept-alive scrape connection would count as a client of a worker
    return HTTP.get(gw.admin_url + "/metrics", headers={"connection": "close"}, timeout=5).text


def _gauge(gw: Any, name: str, **labels: str) -> float:
    return metric_value(_scrape(gw), name, **labels)


def _two_deployments(sims: Any, **extra: Any) -> dict[str, Any]:
    # a first by priority; two failures eject it for 4 s (long enough to be seen on a busy machine); b answers
    # meanwhile (and the retry)
    return {
        "models": [
            priority_model(
                "chat",
                [dep("a", sims.base_url("sim-a")), dep("b", sims.base_url("sim-b"))],
                retry={"max_retries": 1, "budget_percent": 100, "backoff_base_ms": 1, "backoff_max_ms": 1},
                outlier={"consecutive_failures": 2, "base_ejection_s": 4},
            )
        ],
        **extra,
    }


def test_ejected_gauge_goes_back_to_zero_when_the_ejection_ends(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", FAILING), "sim-b": ("us-east", QUICK)})
    gw = gateways(_two_deployments(sims))
    assert _gauge(gw, "llmgw_model_healthy_deployments", model="chat") == 2
    assert _gauge(gw, "llmgw_deployment_ejected", model="chat", deployment="a") == 0
    for _ in range(2):
        assert post_chat(gw).status_code == 200
    text = gw.metrics()
    assert metric_value(text, "llmgw_deployment_ejected", model="chat", deployment="a") == 1
    assert metric_value(text, "llmgw_model_healthy_deployments", model="chat") == 1
    assert metric_value(text, "llmgw_ejections_total", deployment="a") == 1
    sims.set("sim-a", error_rate=0.0)
    # nothing happens at the end of an ejection but time: the gauge must follow it anyway
    wait_until(
        "the ejection to end", lambda: _gauge(gw, "llmgw_deployment_ejected", deployment="a") == 0, timeout=10
    )
    assert _gauge(gw, "llmgw_model_healthy_deployments", model="chat") == 2
    assert 'llmgw_state_backend_up{backend="memory"} 1.0' in gw.metrics()  # nothing shared, nothing down


def test_an_ejection_shared_through_redis_ends_on_the_other_replica_too(sims_factory, gateways, redis_prefix):
    sims = sims_factory({"sim-a": ("us-east", FAILING), "sim-b": ("us-east", QUICK)})
    state = {
        "state": {
            "backend": "redis",
            "redis_url": REDIS_URL,
            "key_prefix": redis_prefix,
            "sync_interval_ms": 100,
        }
    }
    gw1 = gateways(_two_deployments(sims, **state))
    gw2 = gateways(_two_deployments(sims, **state))
    wait_until("gw2's state backend", lambda: 'llmgw_state_backend_up{backend="redis"} 1.0' in gw2.metrics())
    for _ in range(2):
        assert post_chat(gw1).status_code == 200
    sims.set("sim-a", error_rate=0.0)
    # gw2 sent nothing to a: it learns the ejection from Redis, and sees it end on its own clock
    wait_until(
        "gw2 to see the ejection",
        lambda: _gauge(gw2, "llmgw_deployment_ejected", deployment="a") == 1,
        timeout=5,
    )
    assert _gauge(gw2, "llmgw_ejections_total", deployment="a") == 0
    wait_until(
        "gw2 to see it end", lambda: _gauge(gw2, "llmgw_deployment_ejected", deployment="a") == 0, timeout=10
    )
    assert _gauge(gw1, "llmgw_deployment_ejected", deployment="a") == 0


def _client_connections(pid: int, port: int) -> int:
    """Established TCP connections to the gateway's port that this process holds (from procfs)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                n += 1
    return n


def _promtool_check(text: str) -> None:
    proc = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_killed_worker_stops_counting_and_the_scrape_stays_valid(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {**QUICK, "ttft_ms": 6000})})
    gw = gateways(
        {"models": [model("chat", [dep("a", sims.base_url("sim-a"))], timeouts={"ttft_ms": 30000})]},
        workers=2,
    )
    n = 6
    outcomes: list[str] = []

    def stream() -> None:
        with httpx.Client(timeout=30) as c:
            try:
                with c.stream(
                    "POST",
                    gw.url + "/v1/chat/completions",
                    json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                ) as r:
                    body = r.read()
                outcomes.append(
                    "ok" if r.status_code == 200 and b"[DONE]" in body else f"bad {r.status_code}"
                )
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=stream) for _ in range(n)]
    for t in threads:
        t.start()
    wait_until("every request in flight", lambda: _gauge(gw, "llmgw_inflight_requests") == n)
    # the pool gauge is the pod's, whichever worker answers: every worker refreshes its own every second
    wait_until(
        "active connections of both workers",
        lambda: _gauge(gw, "llmgw_pool_connections", state="active") == n,
    )
    workers = worker_pids(gw.proc.pid)
    assert len(workers) == 2
    held = wait_until(
        "the workers' client connections",
        lambda: (
            h
            if sum((h := {pid: _client_connections(pid, gw.port) for pid in workers}).values()) == n
            else None
        ),
    )
    victim = max(held, key=lambda pid: held[pid])
    os.kill(victim, signal.SIGKILL)
    left = n - held[victim]
    wait_until(
        "the dead worker's requests to stop counting", lambda: _gauge(gw, "llmgw_inflight_requests") == left
    )
    wait_until(
        "the dead worker's connections to stop counting",
        lambda: _gauge(gw, "llmgw_pool_connections", state="active") == left,
    )
    wait_until(
        "a replacement worker",
        lambda: len(worker_pids(gw.proc.pid)) == 2 and victim not in worker_pids(gw.proc.pid),
    )
    _promtool_check(_scrape(gw))
    for t in threads:
        t.join(30)
    assert sorted(outcomes).count("ok") == left, outcomes
    wait_until("nothing in flight", lambda: _gauge(gw, "llmgw_inflight_requests") == 0)
    text = _scrape(gw)
    _promtool_check(text)
    # counters of the dead worker stay in the totals; requests it never finished are not counted
    assert metric_value(text, "llmgw_requests_total", code="200") == left
    assert gw.stop() == 0


def _serve(cfg: dict[str, Any], tmp: Path, workers: int, *extra: str) -> subprocess.Popen:
    path = tmp / f"cfg-{workers}-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", str(workers), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_every_worker_logs_json_lines_with_level_logger_and_request_id(sims_factory, tmp_path):
    sims = sims_factory({"sim-a": ("us-east", FAILING), "sim-b": ("us-east", QUICK)})
    port = free_port()
    cfg = {
        **_two_deployments(sims),
        "server": {"host": "127.0.0.1", "port": port},
        "access_log": {"path": str(tmp_path / "access.jsonl"), "format": "json"},
    }
    proc = _serve(cfg, tmp_path, 2, "--log-level", "info")
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return HTTP.get(url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the gateway", ready, timeout=30)
        rid = "ops-test-request-1"
        r = HTTP.post(
            url + "/v1/chat/completions",
            headers={"x-request-id": rid},
            timeout=30,
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200
        r = HTTP.post(
            url + "/v1/chat/completions",
            headers={"x-request-id": rid + "-2"},
            timeout=30,
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = [orjson.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    for rec in lines:
        assert {"timestamp", "level", "logger", "message", "pid"} <= set(rec), rec
        assert rec["timestamp"].endswith("Z") and rec["level"] in (
            "DEBUG",
            "INFO",
            "WARNING",
            "ERROR",
            "CRITICAL",
        )
    # INFO lines of the gateway's own loggers, from both workers
    pools = [rec for rec in lines if rec["logger"] == "llmgw" and rec["message"].startswith("pool a:")]
    assert {rec["level"] for rec in pools} == {"INFO"} and len({rec["pid"] for rec in pools}) == 2, pools
    # a line written while a request ran names it; the two requests may land on either worker
    ejected = [rec for rec in lines if "ejected" in rec["message"]]
    assert ejected and all(rec["request_id"].startswith(rid) for rec in ejected), ejected
    assert not any("request_id" in rec for rec in pools)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_that_fails_exits_non_zero_whatever_the_worker_count(sims_factory, tmp_path, workers):
    sims = sims_factory({"sim-a": ("us-east", QUICK)})
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the admin listener cannot share it
    blocker.listen(1)
    try:
        cfg = {
            "models": [model("chat", [dep("a", sims.base_url("sim-a"))])],
            "server": {"host": "127.0.0.1", "port": free_port(), "admin_port": blocker.getsockname()[1]},
        }
        proc = _serve(cfg, tmp_path, workers)
        _, err = proc.communicate(timeout=60)
    finally:
        blocker.close()
    assert proc.returncode == 3, err.decode()[-2000:]
    assert b"server.admin_port: cannot listen" in err


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_the_public_port_queues_connections_while_start_up_runs(gateways):
    """Readiness is probed on the admin port, which answers once start-up is done; the public port must not
    refuse connections then (uvicorn binds it only after start-up): it listens before start-up, and a
    connection made meanwhile is answered once the gateway is up."""
    silent = (
        socket.socket()
    )  # a provider that accepts connections and never answers: pool pre-warm waits on it
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        gw = gateways(
            {
                "server": {"admin_port": "auto"},
                "models": [model("chat", [dep("a", f"http://127.0.0.1:{silent.getsockname()[1]}/v1")])],
            },
            wait_ready=False,
        )
        admin_port = int(gw.admin_url.rsplit(":", 1)[1])
        give_up = time.monotonic() + 30  # a hang guard, not a timing check
        while not _accepts(gw.port):
            assert gw.proc.poll() is None and time.monotonic() < give_up, gw.stderr()
            time.sleep(0.02)
        # the public port listens while start-up (pre-warming the silent provider) still runs: the admin
        # listener, started when it ends, is not there yet
        assert not _accepts(admin_port)
        early = httpx.Client(base_url=gw.url, timeout=30)
        assert early.get("/v1/models").status_code == 200  # queued, then answered once the gateway is up
        early.close()
        gw.wait_ready()
    finally:
        silent.close()
