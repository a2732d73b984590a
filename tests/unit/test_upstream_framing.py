"""What a provider's response head must satisfy (gateway/upstream/framing.py), decided without a socket."""

from __future__ import annotations

import pytest

from gateway.config import ResponseLimitsConfig
from gateway.upstream.framing import body_fault, encoding_fault, head_fault

LIMITS = ResponseLimitsConfig(max_head_bytes=1024, max_headers=8, max_body_bytes=2048)
OK = [(b"Content-Type", b"application/json"), (b"x-ratelimit-remaining-requests", b"9\tx")]


def test_an_ordinary_head_passes():
    assert head_fault(200, OK, LIMITS) is None
    assert head_fault(103, [], LIMITS) is None and head_fault(599, [], LIMITS) is None


@pytest.mark.parametrize(
    ("status", "raw", "says"),
    [
        (999, OK, "invalid status code 999"),
        (99, OK, "invalid status code 99"),
        (200, [(b"x-a", b"1\x01")], "control character in the value of response header 'x-a'"),
        (200, [(b"x-a", b"1\x7f")], "control character"),
        (200, [(b"x-a", b"1\r\n")], "control character"),
        (
            200,
            [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
            "both Content-Length and Transfer-Encoding",
        ),
        (
            200,
            [(b"x-h%d" % i, b"v") for i in range(9)],
            "more than 8 response headers (response_limits.max_headers)",
        ),
        (200, [(b"x-big", b"a" * 1100)], "larger than 1024 bytes (response_limits.max_head_bytes)"),
        (
            200,
            [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")],
            "content-encoding 'gzip'",
        ),
    ],
)
def test_a_head_breaking_a_rule_names_it(status, raw, says):
    assert says in head_fault(status, raw, LIMITS)


def test_only_a_compressed_event_stream_is_refused():
    assert encoding_fault("application/json", "gzip") is None  # passed on with its Content-Encoding
    assert encoding_fault("text/event-stream", "identity") is None
    assert encoding_fault("text/event-stream", None) is None
    assert encoding_fault("Text/Event-Stream; charset=utf-8", "br") is not None


def test_a_body_is_refused_only_past_its_limit():
    assert body_fault(2048, LIMITS) is None
    assert "larger than 2048 bytes (response_limits.max_body_bytes)" in body_fault(2049, LIMITS)
