"""The one exception tree every upstream client raises, so the engine classifies failures in one way.

``UpstreamError`` is the base; a client maps every failure of its library into one of these (nothing
else escapes ``post`` or a body read except ``asyncio.CancelledError``):

- ``UpstreamConnectError``: the connection could not be opened (refused, DNS, TLS): flag ``UF``.
- ``UpstreamConnectTimeout``: not open within ``timeouts.connect_ms``: ``UF``, timeout_flag ``connect``.
- ``UpstreamResetError``: the connection broke after it was open: ``UC``.
- ``UpstreamProtocolError``: the provider answered, but not in HTTP the gateway accepts (a malformed or
  over-limit head, an impossible status): a provider failure, answered 502 with flag ``UPE``.

The connect and reset errors also subclass the built-in ``ConnectionError`` family, so generic code
(retry helpers, warm-up) that catches ``ConnectionError`` keeps working.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """Any failure talking to a provider, below the HTTP status level."""


class UpstreamConnectError(UpstreamError, ConnectionRefusedError):
    """The connection could not be opened (the engine counts it as a connect failure)."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The connection was not open within ``timeouts.connect_ms`` (logged with timeout_flag connect)."""


class UpstreamResetError(UpstreamError, ConnectionResetError):
    """The connection broke after it was open (the engine counts it as a reset)."""


class UpstreamProtocolError(UpstreamError):
    """The provider's answer broke HTTP or the gateway's limits (the engine answers 502, flag UPE)."""
