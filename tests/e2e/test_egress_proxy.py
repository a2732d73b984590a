"""The default client (h1) through a real forward proxy (tinyproxy): a CONNECT tunnel to a TLS simulator
trusted through ``ca_file``, absolute-form requests to a plain-HTTP one, ``HTTPS_PROXY``/``HTTP_PROXY``
from the environment, and proxy credentials that appear nowhere but on the wire to the proxy."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import Gateway, Sims, TinyProxy, dep, model, self_signed_cert, tls_server_context

from gateway.sim.profile import SimProfile
from gateway.sim.runner import SimThread

FAST = {"ttft_ms": 1, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 2, "tail_p": 0}
PROXY_USER, PROXY_PASSWORD = "egress", "proxy-pw-7f3a9c"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tls_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A simulator serving https on 127.0.0.1 with a self-signed certificate: (port, certificate)."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    profile = SimProfile()
    profile.update(FAST)
    sim = SimThread([("tls", "us-east", profile)])
    sim.servers["tls"].tls = tls_server_context(cert, key)
    port = sim.start()["tls"]
    yield port, cert
    sim.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    p = TinyProxy(tmp_path_factory.mktemp("proxy"), PROXY_USER, PROXY_PASSWORD)
    yield p
    p.stop()


def _served(port: int, cert: Path) -> int:
    stats = httpx.get(
        f"https://127.0.0.1:{port}/sim/stats", verify=ssl.create_default_context(cafile=str(cert)), timeout=5
    ).json()
    return stats["served"]["chat"]


def _everything_shown(gw: Gateway, admin_auth: dict[str, str] | None = None) -> str:
    config = httpx.get(gw.url + "/admin/config", headers=admin_auth or {}, timeout=5).text
    return config + gw.log_path.read_text() + gw.stderr()


def test_tls_provider_through_a_connect_tunnel_with_proxy_auth(tls_sim, proxy, gateways):
    port, cert = tls_sim
    before = _served(port, cert)
    d = dep(
        "tls",
        f"https://127.0.0.1:{port}/v1",
        ca_file=str(cert),
        proxy=f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}",
    )
    gw = gateways({"models": [model("chat", [d])]})
    out = gw.client().chat.completions.create(model="chat", messages=MSG)
    assert out.choices[0].message.content
    assert _served(port, cert) >= before + 1
    assert f"CONNECT 127.0.0.1:{port}" in proxy.log()  # it went through the tunnel, not around it
    shown = _everything_shown(gw)
    assert PROXY_PASSWORD not in shown and f"http://***@127.0.0.1:{proxy.port}" in shown


def test_https_proxy_from_the_environment_and_a_wrong_password_is_a_clean_502(tls_sim, proxy, gateways):
    port, cert = tls_sim
    d = dep(
        "tls-env",
        f"https://127.0.0.1:{port}/v1",
        ca_file=str(cert),
        pool={"validate_on_start": False, "min_connections": 0, "keepwarm_interval_s": 0},
    )
    good = gateways(
        {"models": [model("chat", [d])]},
        env={"HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}"},
    )
    n = proxy.log().count(f"CONNECT 127.0.0.1:{port}")
    assert good.client().chat.completions.create(model="chat", messages=MSG).choices[0].message.content
    assert proxy.log().count(f"CONNECT 127.0.0.1:{port}") == n + 1
    bad = gateways(
        {"models": [model("chat", [d], retry={"max_retries": 0})]},
        env={"HTTPS_PROXY": f"http://{PROXY_USER}:wrong-pw-1234@127.0.0.1:{proxy.port}"},
    )
    r = httpx.post(bad.url + "/v1/chat/completions", json={"model": "chat", "messages": MSG}, timeout=10)
    assert r.status_code == 502, r.text
    assert (
        "refused the CONNECT tunnel" in r.text and "wrong-pw-1234" not in r.text
    )  # tinyproxy: 401, others 407
    assert f":{proxy.port}" not in r.text and f":{port}" not in r.text  # no address reaches the client
    rec = bad.records(wait_for=1)[-1]
    assert rec["response_code"] == 502 and "UF" in rec["response_flags"].split(",")
    assert "wrong-pw-1234" not in _everything_shown(bad)


def test_plain_http_provider_through_the_proxy_in_absolute_form(sims_factory, proxy, gateways):
    sims: Sims = sims_factory({"plain": ("us-east", FAST)})
    d: dict[str, Any] = dep("plain", sims.base_url("plain"))
    gw = gateways(
        {"models": [model("chat", [d])]},
        env={"HTTP_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}"},
    )
    before = sims.stats("plain")["served"]["chat"]
    assert gw.client().chat.completions.create(model="chat", messages=MSG).choices[0].message.content
    assert sims.stats("plain")["served"]["chat"] == before + 1
    assert f"POST {sims.base_url('plain')}/chat/completions" in proxy.log()


def test_no_proxy_and_direct_bypass_the_proxy(sims_factory, proxy, gateways):
    sims: Sims = sims_factory({"listed": ("us-east", FAST), "direct": ("us-east", FAST)})
    # The environment's proxy has no credentials: a request that went through it would get 407.
    env = {
        "HTTP_PROXY": f"http://127.0.0.1:{proxy.port}",
        "NO_PROXY": f"localhost,127.0.0.1:{sims.ports['listed']}",
    }
    gw = gateways(
        {
            "models": [
                model("chat", [dep("listed", sims.base_url("listed"))]),
                model("chat-direct", [dep("direct", sims.base_url("direct"), proxy="direct")]),
            ]
        },
        env=env,
    )
    client = gw.client()
    for name in ("chat", "chat-direct"):
        assert client.chat.completions.create(model=name, messages=MSG).choices[0].message.content
    log = proxy.log()
    assert sims.base_url("listed") not in log and sims.base_url("direct") not in log
