"""Failures recorded as they happened: no access-log line lost to a killed worker, refused requests
logged with the model they named."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from harness import dep
from harness import model as model_

FAST = {"ttft_ms": 1, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 2, "tail_p": 0}


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def test_lines_of_completed_requests_survive_sigkill_of_every_worker(sims_factory, gateways):
    """A line is written in the same event-loop step as its response's last bytes, never batched for
    later: killing every worker at once loses none. Each keep-alive connection stays with one worker,
    which reads a connection's next request only after the step that ended the previous one; so a last
    "fence" request answered on each connection proves its earlier requests' steps are over, without a
    wall-clock wait (the fences' own lines are not counted: they may be microseconds from written)."""
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    gw = gateways({"models": [model_("chat", [dep("a", sims.base_url("sim-a"))])]}, workers=2)
    end = time.monotonic() + 20
    while len(workers_of(gw.proc.pid)) < 2:  # the supervisor's children: the two workers
        assert time.monotonic() < end
        time.sleep(0.05)
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    ids = []
    clients = [httpx.Client(timeout=10) for _ in range(6)]  # a connection each, spread over both workers
    try:
        for i in range(30):
            rid = f"kill-{i}"
            r = clients[i % 6].post(
                gw.url + "/v1/chat/completions",
                json={**body, "stream": i % 2 == 1},
                headers={"x-request-id": rid},
            )
            assert r.status_code == 200
            ids.append(rid)
        for n, c in enumerate(clients):
            fence = c.post(gw.url + "/v1/chat/completions", json=body, headers={"x-request-id": f"fence-{n}"})
            assert fence.status_code == 200
        for pid in workers_of(gw.proc.pid):  # at once, no chance to flush anything
            os.kill(pid, signal.SIGKILL)
    finally:
        for c in clients:
            c.close()
    logged = {rec["request_id"] for rec in gw.records()}
    assert [rid for rid in ids if rid not in logged] == []


REFUSED = [  # (body, error code, the model the log should name)
    ({"model": "chat", "stream": "yes", "messages": []}, "invalid_type", "chat"),
    ({"model": "demo-chat", "messages": "hi"}, "invalid_type", "demo-chat"),
    ({"model": "chat", "stream": True, "messages": [[[[[[[[[[]]]]]]]]]]}, "too_deep", "chat"),
    ({"model": 42, "messages": []}, "invalid_value", None),
    ({"messages": []}, "missing_required_parameter", None),
]


def test_a_refused_request_logs_the_model_it_named(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    gw = gateways(
        {"server": {"max_json_depth": 8}, "models": [model_("chat", [dep("a", sims.base_url("sim-a"))])]}
    )
    for i, (body, code, model) in enumerate(REFUSED):
        r = httpx.post(
            gw.url + "/v1/chat/completions", json=body, headers={"x-request-id": f"bad-{i}"}, timeout=10
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        rec = next(rec for rec in gw.records(wait_for=i + 1) if rec["request_id"] == f"bad-{i}")
        assert (rec["response_code"], rec["response_flags"], rec["model"]) == (400, "BR", model), rec
        assert rec["stream"] is (body.get("stream") is True)


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_workers_drain_and_exit_when_their_supervisor_is_killed(sims_factory, gateways, when):
    """SIGKILL to the supervisor (an OOM kill, kill -9 outside a container) left its workers serving,
    unsupervised and holding the port, so a new gateway could not start. Each worker now drains and exits,
    also one still starting when its supervisor died."""
    sims = sims_factory({"sim-a": ("us-east", FAST)})
    gw = gateways(
        {"models": [model_("chat", [dep("a", sims.base_url("sim-a"))])]},
        workers=2,
        wait_ready=when == "serving",
    )
    end = time.monotonic() + 20
    while len(_workers_of_config(gw.config_path)) < (2 if when == "serving" else 1):
        assert time.monotonic() < end
        time.sleep(0.01)
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    end = time.monotonic() + 30  # each drains (nothing in flight) and exits
    while _workers_of_config(gw.config_path):
        assert time.monotonic() < end, (
            f"workers outlived their supervisor: {_workers_of_config(gw.config_path)}"
        )
        time.sleep(0.05)
    with socket.socket() as s:  # the port is free for the next gateway
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", gw.port))


def _workers_of_config(config: Path) -> list[int]:
    """Live (not zombie) processes serving this config: a worker carries its path in LLMGW_CONFIG."""
    mark = f"LLMGW_CONFIG={config}".encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (
                mark in (proc / "environ").read_bytes()
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids
