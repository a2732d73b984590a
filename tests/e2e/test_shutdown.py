"""Graceful termination, as Kubernetes drives it: SIGTERM during a stream."""

from __future__ import annotations

import signal
import threading
import time

import httpx
from conftest import dep, model


def test_sigterm_drains_the_stream_refuses_new_connections_and_exits_zero(sims_factory, gateways):
    sims = sims_factory({"sim-a": ("us-east", {"ttft_ms": 50, "ttft_dist": "fixed", "itl_ms": 100, "tokens": 20,
                                               "tail_p": 0})})
    gw = gateways({"server": {"drain_timeout_s": 10}, "models": [model("chat", [dep("a", sims.base_url("sim-a"))])]})
    result: dict = {}

    def stream() -> None:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30,
                          json={"model": "chat", "stream": True, "messages": []}) as r:
            result["status"] = r.status_code
            result["body"] = b"".join(r.iter_bytes())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)  # the 2 s stream is under way
    t_sig = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = False
    try:
        httpx.get(gw.url + "/healthz", timeout=1)
    except httpx.ConnectError:
        refused = True
    assert refused, "new connections must be refused once draining"
    t.join(15)
    assert result["status"] == 200
    assert result["body"].count(b'"content":"sim-a#') == 20 and result["body"].rstrip().endswith(b"[DONE]")
    code = gw.proc.wait(15)
    assert code == 0
    assert time.monotonic() - t_sig >= 1.5  # it waited for the stream rather than cutting it
    rec = gw.records(wait_for=1)[-1]
    assert rec["response_code"] == 200 and rec["response_flags"] == "-"
