"""What the edge refuses in a request's headers before reading anything else: a foreign browser origin,
a host name a foreign page could point at the gateway, and a security-relevant header given twice.

**Origins.** Any web page can make a browser POST to a gateway on the user's machine (a ``fetch`` with a
body and no Content-Type needs no CORS preflight), and with ``auth.mode: none`` that spends the provider
quota. Browsers always send ``Origin`` on such a request, so, as Ollama does with ``OLLAMA_ORIGINS``, a
request whose ``Origin`` is neither listed in ``server.cors_origins`` nor the gateway's own is refused
403. The gateway's own origin is the host:port the request was sent to (its ``Host``) when that host
is one no foreign page can hold, as for the Host check below: an IP address, ``localhost``, a name
under it (``app.localhost``) or a name listed in ``server.allowed_hosts`` (the operator's own). That is
the API docs page served by the gateway itself. Any other DNS name is not trusted by itself, since a
foreign page can rebind its own name to the gateway's address and so be "same-origin"; a page of another
local server (another port, or another name under ``localhost``) is listed in ``server.cors_origins``.
Requests without ``Origin`` (SDKs, curl) are not affected.

**Hosts.** A page on a foreign name can rebind that name to the gateway's address (DNS rebinding): the
browser then deems the gateway same-origin, sends the foreign name as ``Host``, and lets the page read the
answers (a GET sends no ``Origin``). As Ollama and Jupyter do, a request is answered only when its
``Host`` is an IP address, ``localhost`` (or a subdomain of it, loopback by RFC 6761), or a name listed in
``server.allowed_hosts``: names no foreign page can hold. Hosts found allowed are remembered, so the
common request pays one set lookup.

**Duplicates.** The edge reads headers into a dict, last one wins; a front proxy may read the first.
Two ``Authorization`` (or ``Host``, ``Content-Length`` ...) headers are how requests are smuggled past
it, so such a request is refused 400 (RFC 9112 3.2 requires it for ``Host``). The dict is built anyway:
a request with no repeated name costs one length comparison (see ``api/asgi.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.flags import ResponseFlag

# One value each, and each decides who is calling, where a request goes, or how its body is read.
SINGLE_VALUE = frozenset(
    {
        b"host",
        b"authorization",
        b"api-key",
        b"content-type",
        b"content-length",
        b"content-encoding",
        b"origin",
        # the gateway's own controls: two values are two instructions, and which one a proxy in front read
        # (or added) is unknown
        b"x-gateway-deployment",
        b"x-gateway-region",
        b"x-gateway-hedge",
        b"x-gateway-timeout-ms",
    }
)


class OriginPolicy:
    """``server.cors_origins`` (exact origins, or ``*`` for any) and the gateway's own origin, which may be
    named by one of ``server.allowed_hosts`` too."""

    def __init__(self, cors_origins: list[str], allowed_hosts: Iterable[str] = ()) -> None:
        self.any_origin = "*" in cors_origins
        # browsers send an origin in lower case without a trailing slash; a config may have either
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins if o != "*")
        self.names = frozenset(h for h in allowed_hosts if h != "*")  # lower case (config.py)

    def listed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def allows(self, origin: str, host: str | None) -> bool:
        return self.listed(origin) or (host is not None and own_origin(origin, host, self.names))


def own_origin(origin: str, host: str, names: frozenset[str] = frozenset()) -> bool:
    """``origin`` is the very host:port the request was sent to, named by a name no foreign page can hold
    (``loopback_or_address`` or one of ``names``, as for the Host check): a page served by the gateway
    itself. Another port, or another name under ``localhost``, is another origin (another local server's
    page, which the browser would not let read the answer without CORS anyway): ``server.cors_origins``
    lists it."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or rest != host.lower():
        return False
    try:
        name = urlsplit(origin).hostname  # without the port and an IPv6 address's brackets
    except ValueError:  # not a URL
        return False
    return name is not None and (name.removesuffix(".") in names or loopback_or_address(name))


SEEN_HOSTS_MAX = 1024  # allowed Host values remembered: a client cycling through ports cannot grow it


class HostPolicy:
    """``server.allowed_hosts`` (exact names) and the hosts no foreign page can hold (see ``host_allowed``)."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.names = frozenset(allowed_hosts)  # validated and in lower case (config.py)
        # no Host at all is no browser's request
        self.seen: set[str | None] = {None, ""}

    def allows(self, host: str | None) -> bool:
        if host in self.seen:
            return True
        if host is None or not host_allowed(host, self.names):
            return False
        if len(self.seen) < SEEN_HOSTS_MAX:
            self.seen.add(host)
        return True


def host_policy(allowed_hosts: list[str]) -> HostPolicy | None:
    """The policy, or None when ``*`` allows any host."""
    return None if "*" in allowed_hosts else HostPolicy(allowed_hosts)


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """``host``, a ``Host`` value with or without its port, is an IP address (IPv6 in brackets),
    ``localhost``, a subdomain of ``localhost``, or one of ``names``."""
    if host.startswith("["):
        address, bracket, port = host[1:].partition("]")
        return (
            bool(bracket)
            and (not port or (port[0] == ":" and _is_port(port[1:])))
            and _is_address(address, ipaddress.IPv6Address)
        )
    name, colon, port = host.partition(":")
    if colon and not _is_port(port):
        return False
    name = name.lower().removesuffix(".")  # "localhost." names the same host
    return name in names or loopback_or_address(name)


def loopback_or_address(name: str) -> bool:
    """``name`` (lower case, an IPv6 address without brackets) is an IP address, ``localhost`` or a name
    under it (loopback by RFC 6761, resolved by the browser itself): names a foreign page cannot point
    at the gateway (DNS rebinding)."""
    name = name.removesuffix(".")
    return (
        name == "localhost"
        or name.endswith(".localhost")
        or _is_address(name, ipaddress.IPv4Address)
        or _is_address(name, ipaddress.IPv6Address)
    )


def _is_port(port: str) -> bool:
    return port.isascii() and port.isdigit()  # isdigit() alone takes "²" (Host is read as latin-1)


def _is_address(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def host_not_allowed(host: str) -> GatewayError:
    return GatewayError(
        403,
        f"Host {host[:200]!r} is not allowed: the gateway answers requests sent to an IP address, localhost "
        "or a name listed in server.allowed_hosts (a foreign web page can point its own name at the gateway).",
        "invalid_request_error",
        "host_not_allowed",
        flag=ResponseFlag.UNAUTHORIZED,
    )


def origin_not_allowed(origin: str) -> GatewayError:
    return GatewayError(
        403,
        f"Origin {origin[:200]!r} is not allowed by server.cors_origins: a web page may call the gateway "
        "only from an origin listed there.",
        "invalid_request_error",
        "origin_not_allowed",
        flag=ResponseFlag.UNAUTHORIZED,
        headers=((b"vary", b"Origin"),),  # the answer depends on it
    )


def duplicated(raw_headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first single-value header the request gives more than once, if any."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in SINGLE_VALUE:
            if name in seen:
                return name.decode("latin-1")
            seen.add(name)
    return None


def duplicate_header(name: str) -> GatewayError:
    return GatewayError(
        400,
        f"The request has more than one {name!r} header; it takes one value.",
        "invalid_request_error",
        "duplicate_header",
        param=name,
        flag=ResponseFlag.DOWNSTREAM_PROTOCOL_ERROR,
    )
