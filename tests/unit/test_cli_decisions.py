"""The CLI's pure decisions: which listen addresses count as loopback (no start-up warning about a port
without keys), and what the warning says."""

from __future__ import annotations

import pytest

from gateway.cli import is_loopback, unguarded_warning
from gateway.config import GatewayConfig, parse_config


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 loopback address written as IPv6
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:10.0.0.1", False),
        ("10.0.0.1", False),
        ("gateway.internal", False),
    ],
)
def test_loopback_listen_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _cfg(**server: object) -> GatewayConfig:
    return parse_config(
        {
            "server": server,
            "models": [{"name": "m", "deployments": [{"id": "d", "base_url": "http://a.test/v1"}]}],
        },
        env={},
    )


def test_the_warning_is_said_beyond_loopback_or_with_any_host_allowed() -> None:
    assert unguarded_warning("::ffff:127.0.0.1", _cfg()) is None
    beyond = unguarded_warning("0.0.0.0", _cfg())
    assert beyond is not None and "server.allowed_hosts" in beyond and "auth.mode: none" in beyond
    star = unguarded_warning("127.0.0.1", _cfg(allowed_hosts=["*"]))
    assert star is not None and "DNS rebinding" in star
