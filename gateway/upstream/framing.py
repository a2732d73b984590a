"""What a provider's response head must satisfy before the gateway relays any of it (every client alike).

A head that fails here is the provider's protocol error: the request gets a 502 (flag UPE) instead of a
reply no client can read (a status uvicorn cannot send, a control byte that makes it drop the response).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.config import ResponseLimitsConfig

# Control bytes other than HTAB may not appear in a field value (RFC 9110 5.5); uvicorn refuses to send them.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def status_fault(status: int) -> str | None:
    if 100 <= status <= 599:
        return None
    return f"invalid status code {status} (outside 100-599)"


def count_fault(count: int, limits: ResponseLimitsConfig) -> str | None:
    if count <= limits.max_headers:
        return None
    return f"more than {limits.max_headers} response headers (response_limits.max_headers)"


def size_fault(size: int, limits: ResponseLimitsConfig) -> str | None:
    if size <= limits.max_head_bytes:
        return None
    return f"response head larger than {limits.max_head_bytes} bytes (response_limits.max_head_bytes)"


def body_fault(size: int, limits: ResponseLimitsConfig) -> str | None:
    if size <= limits.max_body_bytes:
        return None
    return f"response body larger than {limits.max_body_bytes} bytes (response_limits.max_body_bytes)"


def encoding_fault(content_type: str | None, content_encoding: str | None) -> str | None:
    """An event stream the gateway cannot read: compressed although it asked for identity.

    A non-stream body is passed on with its ``Content-Encoding`` for the client to decode; a stream's
    events must be read to find the first token, and are relayed as they arrive."""
    if not content_encoding or content_encoding.strip().lower() == "identity":
        return None
    if content_type is None or not content_type.lstrip().lower().startswith("text/event-stream"):
        return None
    return f"an event stream with content-encoding {content_encoding!r} although identity was asked"


def transfer_fault(transfer_encoding: str) -> str | None:
    """A transfer coding other than chunked (``gzip, chunked``): the parser would undo the chunking and
    pass the compressed bytes on as the body, with nothing to say they are compressed (RFC 9112 6.1)."""
    if transfer_encoding.strip().lower() == "chunked":
        return None
    return f"transfer-encoding {transfer_encoding[:100]!r} (only chunked is read)"


def head_fault(status: int, raw: Iterable[tuple[bytes, bytes]], limits: ResponseLimitsConfig) -> str | None:
    """Everything above for a head parsed whole by a library (the h1 client checks as it parses)."""
    fault = status_fault(status)
    if fault is not None:
        return fault
    count = size = 0
    framing = set()
    ctype = encoding = b""
    for name, value in raw:
        count += 1
        size += len(name) + len(value) + 4
        if _CTL.search(value) is not None:
            return f"a control character in the value of response header {name.decode('latin-1')!r}"
        lower = name.lower()
        if lower in _FRAMING:
            framing.add(lower)
        elif lower == b"content-type":
            ctype = value
        elif lower == b"content-encoding":
            encoding = value
    if len(framing) == 2:  # the httptools parser (h1) refuses these alike: a smuggling vector
        return "both Content-Length and Transfer-Encoding in the response head"
    return (
        count_fault(count, limits)
        or size_fault(size, limits)
        or encoding_fault(ctype.decode("latin-1"), encoding.decode("latin-1"))
    )
