"""OpenAI-shaped error bodies, and the gateway's error vocabulary (status, type, code, response flag)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

import orjson

from gateway.flags import ResponseFlag


@dataclass(frozen=True, slots=True)
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    # a ResponseFlag (gateway/flags.py) for the access log, or several as logged ("RL,RLL")
    flag: str | None = None
    retry_after: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # more response headers (x-ratelimit-* on a 429)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def undelivered(self) -> GatewayError:
        """This error as logged when its answer never left the gateway (the connection was cut first): its
        flag and DC, as a success so cut is logged 200 DC."""
        gone = ResponseFlag.CLIENT_GONE
        return replace(self, flag=f"{self.flag},{gone}" if self.flag else gone)


def error_body(message: str, typ: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": typ, "param": param, "code": code}})


MAX_ECHOED: Final = 256  # characters of a client-chosen name that the gateway repeats back or records


def echoed(name: str) -> str:
    """A client-chosen name as the gateway repeats it (error messages, the access log, spans): whole when
    short, else its start and its length. The body limit allows a 10 MB model name; repeating it whole
    would make each such request a 10 MB answer and a 10 MB log line."""
    if len(name) <= MAX_ECHOED:
        return name
    return f"{name[:MAX_ECHOED]}... ({len(name)} characters)"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param, flag=ResponseFlag.BAD_REQUEST)


def model_not_found(name: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{echoed(name)}' does not exist on this gateway. GET /v1/models lists the models.",
        "invalid_request_error",
        "model_not_found",
        "model",
        flag=ResponseFlag.NO_ROUTE,
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the gateway's limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
        None,
        flag=ResponseFlag.BAD_REQUEST,
    )


def method_not_allowed(method: str, allowed: str) -> GatewayError:
    return GatewayError(
        405,
        f"Method {method} is not allowed here; use {allowed}.",
        "invalid_request_error",
        "method_not_allowed",
        None,
        flag=ResponseFlag.BAD_REQUEST,
        headers=((b"allow", allowed.encode()),),  # a 405 names what is allowed (RFC 9110 15.5.6)
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(
        404,
        f"Unknown path {path}. The gateway serves the OpenAI API under /v1.",
        "invalid_request_error",
        "unknown_url",
        None,
        flag=ResponseFlag.NO_ROUTE,
    )


def overloaded(scope: str, retry_after: str = "1") -> GatewayError:
    return GatewayError(
        503,
        f"The gateway is at its {scope} concurrency limit; retry shortly.",
        "server_error",
        "overloaded",
        None,
        flag=ResponseFlag.OVERFLOW,
        retry_after=retry_after,
    )


def upstream_unreachable(detail: str, flag: str = ResponseFlag.UPSTREAM_CONNECT_FAILURE) -> GatewayError:
    return GatewayError(
        502,
        f"The upstream could not be reached: {detail}",
        "server_error",
        "upstream_unreachable",
        None,
        flag=flag,
    )


def deadline_exceeded(message: str, flag: str) -> GatewayError:
    return GatewayError(504, message, "timeout_error", "timeout", None, flag=flag)


def upstream_protocol_error(detail: str) -> GatewayError:
    return GatewayError(
        502,
        f"The upstream's answer could not be used: {detail}",
        "server_error",
        "upstream_protocol_error",
        None,
        flag=ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
    )


def draining() -> GatewayError:
    return GatewayError(
        503,
        "The gateway is shutting down; retry on another replica.",
        "server_error",
        "draining",
        None,
        flag=ResponseFlag.DRAINING,
        retry_after="1",
    )


def internal_error() -> GatewayError:
    """A gateway bug (an unexpected exception): a 500 the client can report, flag GE; the detail is logged."""
    return GatewayError(
        500,
        "The gateway failed to handle the request (an internal error, logged).",
        "server_error",
        "internal_error",
        None,
        flag=ResponseFlag.INTERNAL_ERROR,
    )
