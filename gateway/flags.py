"""Response flags: the access log's one-word account of what went wrong (Envoy's vocabulary).

A ``StrEnum``, so a flag is its short name wherever a string goes (the log line, a metric label).
docs/operations.md ("Response flags") says what each means and what to do about it.
"""

from __future__ import annotations

from enum import StrEnum


class ResponseFlag(StrEnum):
    UPSTREAM_TIMEOUT = "UT"  # no first token within ttft_ms / per_try_ms, or a stream idle too long
    UPSTREAM_CONNECT_FAILURE = "UF"
    UPSTREAM_RESET = "UC"  # the connection broke, before the answer or mid-stream
    UPSTREAM_PROTOCOL_ERROR = "UPE"  # the provider's answer was not acceptable HTTP (answered 502)
    NO_HEALTHY_UPSTREAM = "UH"
    RETRY_LIMIT_EXCEEDED = "URX"  # the answering model's retries ended by max_retries or the retry budget
    OVERFLOW = "UO"  # a concurrency limit refused the request at once
    DEADLINE = "DT"  # the request deadline ran out
    CLIENT_GONE = "DC"  # the client disconnected
    RATE_LIMITED = "RL"
    # the key's rpm/tpm were checked on this process alone: the shared state (Redis) did not answer, so the
    # replicas do not share the count (on admitted requests too; a refusal so decided is "RL,RLL")
    LOCAL_LIMITS = "RLL"
    UNAUTHORIZED = "UAEX"
    DRAINING = "LR"
    HEDGE_SUPPRESSED = "HS"
    BAD_REQUEST = "BR"
    NO_ROUTE = "NR"
    INTERNAL_ERROR = "GE"  # a gateway bug: an unexpected exception answered 500
    REQUEST_HEADERS_TIMEOUT = "HT"  # the request head did not arrive within server.request_headers_timeout_s
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # the client's bytes were not HTTP/1.1 the parser could read
