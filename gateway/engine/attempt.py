"""One upstream try: send, wait for headers, read until the first usable token (or the whole body).

An Attempt does I/O and records what happened; it decides nothing. The Exchange decides whether
it won, is retried, or is cancelled. A cancelled attempt aborts its HTTP request (the connection is
closed), so the provider stops generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from gateway.engine.alarms import Alarms
from gateway.engine.interrupt import CancelReason, Interrupt
from gateway.engine.registry import DeploymentRuntime
from gateway.engine.sse import FirstTokenScanner
from gateway.policy.budget import RetryBudget
from gateway.policy.retry import FailureKind, parse_retry_after
from gateway.upstream.base import ResponseHeaders, UpstreamResponse
from gateway.upstream.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from gateway.upstream.wire import AttemptWire

MAX_ERROR_BODY = 64 * 1024


class AttemptKind(StrEnum):
    PRIMARY = "primary"
    RETRY = "retry"
    HEDGE = "hedge"


class AttemptState(StrEnum):
    RUNNING = "running"
    READY = "ready"  # first usable token (stream) or whole body (non-stream) in hand
    FAILED = "failed"
    CANCELLED = "cancelled"


class Attempt:
    __slots__ = (
        "kind",
        "dep",
        "index",
        "wire",
        "state",
        "t_start",
        "t_headers",
        "t_first",
        "t_end",
        "status",
        "failure",
        "timeout_flag",
        "retry_after_s",
        "resp",
        "chunks",
        "body",
        "error_detail",
        "resp_headers",
        "released",
        "finished",
        "budget",
        "now",
        "interrupt",
        "outcome",
        "token_seen",
    )

    def __init__(
        self, kind: AttemptKind, dep: DeploymentRuntime, index: int, now: Callable[[], float]
    ) -> None:
        self.kind = kind
        self.dep = dep
        self.index = index
        self.now = now  # the engine's clock
        self.wire = AttemptWire()
        self.state = AttemptState.RUNNING
        self.t_start = now()
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.status: int | None = None
        self.failure: FailureKind | None = None
        self.timeout_flag: str | None = None
        self.retry_after_s: float | None = None
        self.resp: UpstreamResponse | None = None
        self.chunks: list[bytes] = []  # stream bytes read before commit
        self.body: bytes = b""  # non-stream body, or an upstream error body
        self.error_detail = ""
        self.resp_headers: dict[str, str] | None = None
        self.released = False
        self.finished = False
        # False for a stream that ended (or filled PRE_TOKEN_MAX) before a usable token
        self.token_seen = True
        self.budget: RetryBudget | None = None  # whose slot this retry holds
        self.interrupt: Interrupt | None = None  # how to stop the task this attempt runs in
        self.outcome: str | None = (
            None  # its llmgw_upstream_attempts_total label, once counted (exactly once)
        )
        dep.inflight += 1

    @property
    def ok(self) -> bool:
        return self.state is AttemptState.READY

    async def run(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str],
        stream: bool,
        first_token_timeout_s: float,
        timeout_flag: str,
        wall_now: float,
        alarms: Alarms,
        interrupt: Interrupt,
    ) -> Attempt:
        """Run until READY or FAILED; raise CancelledError (after aborting) if cancelled for another reason.

        The first-token limit is an alarm on the shared ``alarms`` that interrupts the task this runs in
        (``interrupt``) with FIRST_TOKEN_TIMEOUT; any other interrupt is not this attempt's to handle.
        """
        self.interrupt = interrupt
        if interrupt.task is None:
            interrupt.task = asyncio.current_task()
        now = self.now
        alarm = alarms.at(self.t_start + first_token_timeout_s, self._expire)
        try:
            resp = await self.dep.client.post(path, body, headers, self.wire)
            self.resp = resp
            self.t_headers = now()
            if resp.status != 200:
                await self._read_error(resp, wall_now)
                return self
            if stream:
                scanner = FirstTokenScanner()
                content = resp.content
                while True:
                    chunk = await content.readany()
                    if not chunk:  # stream ended before any usable token: commit what there is
                        break
                    self.chunks.append(chunk)
                    if scanner.feed(chunk):
                        break
                if scanner.error is not None:  # the provider failed before a token: nothing was relayed yet
                    raise UpstreamProtocolError(
                        "an error event before the first token: " + scanner.error.decode("utf-8", "replace")
                    )
                self.t_first = now()
                self.token_seen = scanner.token_seen
            else:
                self.body = await resp.read()
                self.t_first = self.t_end = now()
                self.resp_headers = _forwardable(resp.headers)
                resp.release()
                self.released = True
            self.state = AttemptState.READY
            return self
        except asyncio.CancelledError:
            if interrupt.claim(CancelReason.FIRST_TOKEN_TIMEOUT) is None:  # someone else's interrupt
                self.state = AttemptState.CANCELLED
                self.abort()
                raise
            self._fail(
                FailureKind.TIMEOUT,
                f"no {'first token' if stream else 'response'} within "
                f"{first_token_timeout_s * 1000:.0f} ms ({timeout_flag})",
            )
            self.timeout_flag = timeout_flag
        except UpstreamConnectTimeout as exc:  # timeouts.connect_ms
            self._fail(FailureKind.CONNECT, _describe(exc))
            self.timeout_flag = "connect"
        except UpstreamConnectError as exc:
            self._fail(FailureKind.CONNECT, _describe(exc))
        except UpstreamProtocolError as exc:
            self._fail(FailureKind.PROTOCOL, _describe(exc))
        except UpstreamError as exc:  # reset, and any other failure a client maps into the tree
            self._fail(FailureKind.RESET, _describe(exc))
        finally:
            alarms.cancel(alarm)
        self.abort()
        return self

    def _expire(self) -> None:
        self.stop(CancelReason.FIRST_TOKEN_TIMEOUT)

    def stop(self, reason: CancelReason) -> None:
        """Interrupt the task this attempt runs in (a no-op before it started)."""
        if self.interrupt is not None:
            self.interrupt.cancel(reason)

    def _fail(self, kind: FailureKind, detail: str) -> None:
        self.state = AttemptState.FAILED
        self.failure = kind
        self.error_detail = detail
        self.t_end = self.now()

    async def _read_error(self, resp: UpstreamResponse, wall_now: float) -> None:
        self.status = resp.status
        self.body = await resp.content.read(MAX_ERROR_BODY)
        self.resp_headers = _forwardable(resp.headers)
        self.retry_after_s = parse_retry_after(resp.headers.get("retry-after"), wall_now)
        self._fail(FailureKind.STATUS, f"upstream answered {resp.status}")
        resp.release()
        self.released = True

    def abort(self) -> None:
        """Close the upstream connection now (the provider sees it and stops generating)."""
        if self.t_end is None:
            self.t_end = self.now()
        resp = self.resp
        if resp is not None and not self.released:
            resp.close()
            self.released = True

    def finish(self) -> None:
        """Release bookkeeping once the attempt is over for good (won and relayed, lost, or failed)."""
        if self.finished:
            return
        self.finished = True
        self.dep.inflight -= 1
        if self.budget is not None:
            self.budget.release()
        if self.t_end is None:
            self.t_end = self.now()


_FORWARD_PREFIXES: Final = ("x-ratelimit-", "openai-", "anthropic-", "x-ms-")
# the body is relayed as is; x-should-retry: a provider's own word to the SDK on its error
_FORWARD_NAMES: Final = frozenset({"content-type", "retry-after", "content-encoding", "x-should-retry"})


def _forwardable(headers: ResponseHeaders) -> dict[str, str]:
    out = {}
    for k, v in headers.items():
        lk = k.lower()
        if lk in _FORWARD_NAMES or lk.startswith(_FORWARD_PREFIXES):
            out[lk] = v
    return out


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
