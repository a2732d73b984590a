"""Egress through a forward proxy: which proxy a deployment uses, and opening a connection through it.

Platform networks often let traffic out only through a proxy. A deployment's ``proxy`` key names one
(``http://[user:password@]host:port``) or turns proxies off (``direct``); unset, the environment decides
as curl and the OpenAI SDK do: ``HTTPS_PROXY`` for https:// providers, ``HTTP_PROXY`` for http:// ones
(lower-case names first), and ``NO_PROXY`` hosts go direct.

- https:// providers: a ``CONNECT host:port`` tunnel, then TLS with the provider inside it, so the
  proxy sees neither the request nor the key.
- http:// providers: the request goes to the proxy in absolute form (``POST http://host/v1/...``,
  RFC 9112 3.2.2) and the proxy forwards it.

Proxy credentials travel only in ``Proxy-Authorization``. Failures name neither the proxy nor the
provider: their text reaches clients.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from gateway.upstream.errors import UpstreamConnectError

MAX_CONNECT_RESPONSE = 16 * 1024  # a proxy's answer to CONNECT is a short head


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value; never logged


def proxy_for(base_url: str, setting: str | None, env: Mapping[str, str]) -> ProxyRoute | None:
    """The proxy a deployment's connections go through, or None for direct connections."""
    if setting == "direct":
        return None
    target = urlsplit(base_url)
    source = "proxy"
    if setting is None:
        names = ("https_proxy", "HTTPS_PROXY") if target.scheme == "https" else ("http_proxy", "HTTP_PROXY")
        source = next((n for n in names if env.get(n)), "")
        if not source or bypassed(
            target.hostname or "", target.port, env.get("no_proxy") or env.get("NO_PROXY")
        ):
            return None
        setting = env[source]
        if "://" not in setting:  # HTTPS_PROXY=proxy:3128 is common
            setting = "http://" + setting
    url = urlsplit(setting)
    if url.scheme != "http" or not url.hostname:  # named without its credentials
        raise ValueError(
            f"{source}: unsupported proxy {url.scheme}://{url.hostname or ''} (expected http://host:port)"
        )
    auth = None
    if url.username is not None:
        raw = f"{unquote(url.username)}:{unquote(url.password or '')}".encode("latin-1")
        auth = "Basic " + base64.b64encode(raw).decode("ascii")
    port = url.port or 80
    return ProxyRoute(url.hostname, port, auth)


def bypassed(host: str, port: int | None, no_proxy: str | None) -> bool:
    """Whether NO_PROXY sends ``host`` direct: ``*``, a host or domain suffix (``example.com`` and
    ``.example.com`` both cover ``api.example.com``), an IP address or CIDR block, each optionally ``:port``."""
    if not no_proxy:
        return False
    host = host.lower().strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if want_port and want_port.isdigit() and port is not None and int(want_port) != port:
            continue
        name = name.strip("[]")
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


class _ConnectHandshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; the connection is handed to the real protocol afterwards."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.answer.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end >= 0:
            self.answer.set_result(self._buf)
        elif len(self._buf) > MAX_CONNECT_RESPONSE:
            self.answer.set_exception(UpstreamConnectError("proxy's CONNECT answer is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(UpstreamConnectError("proxy closed the connection during CONNECT"))


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.Protocol,
    route: ProxyRoute | None,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
) -> None:
    """Connect ``protocol`` to host:port: directly, or through ``route`` (a CONNECT tunnel for TLS, the
    proxy itself for plain HTTP, whose requests then carry the absolute URL)."""
    factory: Callable[[], asyncio.Protocol] = lambda: protocol  # noqa: E731
    if route is None:
        await loop.create_connection(factory, host, port, ssl=tls, server_hostname=host if tls else None)
        return
    if tls is None:
        await loop.create_connection(factory, route.host, route.port)
        return
    transport, handshake = await loop.create_connection(
        lambda: _ConnectHandshake(loop), route.host, route.port
    )
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        auth = f"proxy-authorization: {route.authorization}\r\n" if route.authorization else ""
        transport.write(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n{auth}\r\n".encode("latin-1"))
        answer = await handshake.answer
        head, _, rest = answer.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.") and head.count(b" ") >= 1 else b"?"
        if status != b"200":
            line = head.split(b"\r\n", 1)[0].decode("latin-1")[:200]
            # Neither the proxy's address nor the provider's: this text reaches clients (the deployment id
            # the gateway adds to it is how an operator finds both in the config)
            raise UpstreamConnectError(f"the egress proxy refused the CONNECT tunnel: {line}")
        if rest:  # the provider speaks only after our TLS hello: anything here is the proxy misbehaving
            raise UpstreamConnectError("the egress proxy sent data after its CONNECT answer")
        tls_transport = await loop.start_tls(transport, protocol, tls, server_hostname=host)
    except BaseException:
        transport.close()
        raise
    if tls_transport is None:
        raise UpstreamConnectError("TLS through the egress proxy did not start")
    protocol.connection_made(tls_transport)
