"""What the edge refuses in a proxy request's headers before reading anything else: a foreign browser
origin, and a security-relevant header given twice.

**Origins.** Any web page can make a browser POST to a gateway on the user's machine (a ``fetch`` with a
body and no Content-Type needs no CORS preflight), and with ``auth.mode: none`` that spends the provider
quota. Browsers always send ``Origin`` on such a request, so, as Ollama does with ``OLLAMA_ORIGINS``, a
request whose ``Origin`` is neither listed in ``server.cors_origins`` nor the gateway's own is refused
403. The gateway's own origin is the host the request was sent to (its ``Host``) when that is an IP
address or ``localhost``: the API docs page served by the gateway itself. A DNS name is not trusted by
itself, since a foreign page can rebind its own name to the gateway's address and so be "same-origin";
a gateway reached by name lists its origin in ``server.cors_origins``. Requests without ``Origin``
(SDKs, curl) are not affected.

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
    }
)


class OriginPolicy:
    """``server.cors_origins`` (exact origins, or ``*`` for any) and the gateway's own origin."""

    def __init__(self, cors_origins: list[str]) -> None:
        self.any_origin = "*" in cors_origins
        # browsers send an origin in lower case without a trailing slash; a config may have either
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins if o != "*")

    def listed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def allows(self, origin: str, host: str | None) -> bool:
        return self.listed(origin) or (host is not None and own_origin(origin, host))


def own_origin(origin: str, host: str) -> bool:
    """``origin`` is the very host:port the request was sent to, named by an address or ``localhost``:
    a page served by the gateway itself, which no foreign page can pose as."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or rest != host.lower():
        return False
    try:
        name = urlsplit(origin).hostname or ""  # without the port and an IPv6 address's brackets
        if name != "localhost":
            ipaddress.ip_address(name)
    except ValueError:  # not an address, or not a URL
        return False
    return True


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
