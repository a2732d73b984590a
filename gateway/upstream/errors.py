"""Transport failures every upstream client raises alike, so the engine classifies them in one way.

They subclass the built-in ``ConnectionError`` family: a refused or timed-out connect is a connect
failure (UF), anything after the connection was open is a reset (UC).
"""

from __future__ import annotations


class UpstreamConnectError(ConnectionRefusedError):
    """The connection could not be opened (the engine counts it as a connect failure)."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The connection was not open within ``timeouts.connect_ms`` (logged with timeout_flag connect)."""


class UpstreamResetError(ConnectionResetError):
    """The connection broke after it was open (the engine counts it as a reset)."""


class UpstreamProtocolError(UpstreamResetError):
    """The provider's answer broke HTTP/1.1 or a response limit (bad status, malformed or oversized head,
    a body past ``response_limits.max_body_bytes``): the connection is closed, the engine answers 502 (UPE)."""
