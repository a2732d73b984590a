"""An in-memory upstream and downstream for driving an ``Exchange`` on a fake clock (no sockets, no sleeps).

In the spirit of ``httpx.MockTransport``: a handler sees each upstream request and returns a ``Reply``
(status, headers, chunks), every step delayed on the fake clock. ``ScriptedUpstream.client`` is the
``Engine``'s client factory, so the real engine, routing, retries, hedging and relay run against it;
``Downstream`` collects what the exchange sends to the client, as an ASGI server would.

``Playbook`` wires a real ``Engine`` (its config parsed by the real loader) to both and to a
``FakeClock``; ``play(seconds)`` moves the clock on, firing alarms and delays in time order and
letting the event loop settle after each, so a test reads as a script: this arrives, then this is sent.
The module-level ``play(scenario)``, ``model(...)`` and ``OK`` are the shared pieces of such scripts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from fake_clock import FakeClock

from gateway.config import DeploymentConfig, parse_config
from gateway.engine.engine import Engine
from gateway.engine.exchange import Exchange
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.timing import now as wall_now
from gateway.upstream.errors import UpstreamResetError
from gateway.upstream.wire import AttemptWire, host_of, static_headers

SETTLE_TICKS = 50  # loop iterations that let every ready callback run after a clock step

T = TypeVar("T")

# A non-streamed completion as a provider sends it.
OK = {
    "id": "c1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def play(scenario: Callable[[], Awaitable[T]], guard_s: float = 30) -> T:
    """Run a playbook scenario to its end; its result.

    ``guard_s`` is real time, a guard only against a hang of the test itself: the scenario's own time is
    the fake clock's.
    """
    return asyncio.run(asyncio.wait_for(scenario(), guard_s))


def model(name: str, *deployments: str, **cfg: Any) -> dict[str, Any]:
    """A model's config for ``Playbook``, its deployments named by id, round-robin unless ``cfg`` says else."""
    return {"name": name, "deployments": list(deployments), "routing": {"strategy": "round-robin"}, **cfg}


def sse(text: str) -> bytes:
    """One chat-completion chunk with content ``text``, as an SSE event."""
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """What the provider does with one request. Delays are seconds on the fake clock."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (delay before it, bytes)
    head_after: float = 0.0  # until the response head arrives
    fail: BaseException | None = None  # raised by post() at head_after instead of a head (connect, reset...)
    then_fail: BaseException | None = None  # raised after the chunks (a stream broken mid-way)
    stall: bool = False  # after the chunks, send nothing more until the gateway closes the connection
    # The body's end comes with its last chunk (HTTP/1.1's terminator in the same read): ``at_eof`` is
    # True as that chunk is read. Otherwise the end is known only when the reader asks again (httpx).
    end_with_last: bool = False

    @staticmethod
    def json(
        body: dict[str, Any], *, after: float = 0.0, status: int = 200, headers: dict[str, str] | None = None
    ) -> Reply:
        h = {"content-type": "application/json", **(headers or {})}
        return Reply(status, h, [(0.0, orjson.dumps(body))], head_after=after)

    @staticmethod
    def stream(
        *chunks: tuple[float, bytes],
        head_after: float = 0.0,
        then_fail: BaseException | None = None,
        stall: bool = False,
        end_with_last: bool = False,
    ) -> Reply:
        return Reply(
            200,
            {"content-type": "text/event-stream"},
            list(chunks),
            head_after=head_after,
            then_fail=then_fail,
            stall=stall,
            end_with_last=end_with_last,
        )


@dataclass
class Request:
    """One upstream request as the provider saw it."""

    deployment: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float  # fake-clock time it was sent
    closed_at: float | None = None  # when the gateway closed the connection before the end (an abort)
    released: bool = False


Handler = Callable[[Request], Reply]


class _Body:
    """``ResponseBody`` over a scripted reply, obeying the read contract of gateway/upstream/base.py."""

    def __init__(self, clock: FakeClock, reply: Reply, req: Request) -> None:
        self._clock = clock
        self._steps = list(reply.chunks)
        self._reply = reply
        self._req = req
        self._buf = b""
        self._eof = False

    async def _next(self) -> bytes:
        if self._steps:
            delay, data = self._steps.pop(0)
            if delay > 0:
                await self._clock.sleep(delay)
            r = self._reply
            if not self._steps and r.end_with_last and r.then_fail is None and not r.stall:
                self._eof = True
            return data
        if self._reply.then_fail is not None:
            self._eof = True
            raise self._reply.then_fail
        if self._reply.stall:
            await asyncio.get_running_loop().create_future()  # until the reader is cancelled
        self._eof = True
        return b""

    async def readany(self) -> bytes:
        if self._buf:
            data, self._buf = self._buf, b""
            return data
        if self._eof:
            return b""
        if self._req.closed_at is not None:
            raise UpstreamResetError("read after close")
        return await self._next()

    async def read(self, n: int = -1) -> bytes:
        parts, have = [self._buf], len(self._buf)
        self._buf = b""
        while (n < 0 or have < n) and not self._eof:
            data = await self._next()
            parts.append(data)
            have += len(data)
        data = b"".join(parts)
        if 0 <= n < len(data):
            data, self._buf = data[:n], data[n:]
        return data

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf and not self._steps


class _Headers(dict[str, str]):
    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, key.lower(), default)


class _Response:
    """``UpstreamResponse`` over a scripted reply."""

    def __init__(self, clock: FakeClock, reply: Reply, req: Request) -> None:
        self.status = reply.status
        self.headers = _Headers({k.lower(): v for k, v in reply.headers.items()})
        self.content = _Body(clock, reply, req)
        self._req = req
        self._clock = clock

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        if self.content.at_eof:
            self._req.released = True
        else:
            self.close()

    def close(self) -> None:
        if self._req.closed_at is None and not self._req.released:
            self._req.closed_at = self._clock.t


class ScriptedClient:
    """``UpstreamClient`` for one deployment, answering from the handler."""

    def __init__(self, upstream: ScriptedUpstream, dep: DeploymentConfig) -> None:
        self.deployment = dep
        self.host = host_of(dep.base_url)
        self.static_headers = static_headers(dep)
        self._up = upstream

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def post(self, path: str, body: bytes, headers: dict[str, str], wire: AttemptWire) -> _Response:
        up = self._up
        req = Request(self.deployment.id, path, json.loads(body), headers, up.clock.t)
        up.requests.append(req)
        reply = up.handler(req)
        try:
            if reply.head_after > 0:
                await up.clock.sleep(reply.head_after)
        except asyncio.CancelledError:
            req.closed_at = up.clock.t  # the gateway gave up before the head: the provider sees the close
            raise
        if reply.fail is not None:
            raise reply.fail
        wire.reused = True
        return _Response(up.clock, reply, req)

    async def get(self, path: str, timeout_s: float) -> tuple[int, bytes]:
        return 200, b'{"data": []}'

    @property
    def connections_opened(self) -> int:
        return 0

    def pool_counts(self) -> dict[str, int]:
        return {"idle": 0, "active": 0}

    async def warm(self, n: int, timeout_s: float) -> list[tuple[int, bytes] | BaseException]:
        return []


class ScriptedUpstream:
    """Every deployment's provider: ``handler(request) -> Reply``; ``requests`` is what they received."""

    def __init__(self, clock: FakeClock, handler: Handler) -> None:
        self.clock = clock
        self.handler = handler
        self.requests: list[Request] = []

    def client(self, dep: DeploymentConfig) -> ScriptedClient:
        return ScriptedClient(self, dep)

    def to(self, deployment: str) -> list[Request]:
        return [r for r in self.requests if r.deployment == deployment]


class Downstream:
    """A fake ASGI ``send``: what the client received, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.complete = False

    async def send(self, message: dict[str, Any]) -> None:
        assert not self.complete, "sent after the response was complete"
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) <= 1, "two response heads"
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[str]:
        """The SSE events' data fields, in order."""
        return [line[6:] for line in self.body.decode().split("\n") if line.startswith("data: ")]


class Call:
    """One client request in flight through an Exchange."""

    def __init__(self, task: asyncio.Task[None], down: Downstream) -> None:
        self.task = task
        self.down = down
        self.exchange: Exchange | None = None
        self.record: dict[str, Any] | None = None


def _deployment(name: str) -> dict[str, Any]:
    return {"id": name, "base_url": f"http://{name}.provider.test/v1", "api_key": "sk-test"}


class Playbook:
    """A real Engine on a fake clock, its providers scripted by ``handler``.

    ``models``: model configs as in a config file; a deployment may be given by its id alone.
    """

    def __init__(self, models: list[dict[str, Any]], handler: Handler) -> None:
        self.clock = FakeClock()
        self.upstream = ScriptedUpstream(self.clock, handler)
        for m in models:
            m["deployments"] = [_deployment(d) if isinstance(d, str) else d for d in m["deployments"]]
        cfg = parse_config({"models": models}, env={})
        self.engine = Engine(
            cfg,
            home_region=None,
            metrics=Metrics(),
            access_log=None,
            seed=1,
            clock=self.clock,
            upstream=self.upstream.client,
        )
        self.records: list[dict[str, Any]] = []
        self.engine.on_record.append(lambda ex, rec: self.records.append(rec))

    def call(self, model: str, *, stream: bool = False, headers: dict[str, str] | None = None) -> Call:
        """The client sends a chat completion request now."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        raw = orjson.dumps(body)
        hdrs = {"content-type": "application/json", **(headers or {})}
        down = Downstream()
        eng = self.engine
        t0 = self.clock.t

        async def run() -> None:
            assert eng.admit()
            deadline, rejected = eng.check_request(model, hdrs, t0)
            ex = Exchange(
                eng,
                asyncio.current_task(),
                path="/v1/chat/completions",
                upstream_path="/chat/completions",
                body=body,
                raw_len=len(raw),
                headers=hdrs,
                t_received=t0,
                t_body=t0,
                wall_start=wall_now(),
                request_id=f"req-{len(self.records)}",
                client="127.0.0.1:1",
                deadline=deadline,
                rejected=rejected,
            )
            call.exchange = ex
            n = len(self.records)
            await ex.run(down.send)
            call.record = self.records[n]

        call = Call(asyncio.get_running_loop().create_task(run()), down)
        return call

    async def settle(self) -> None:
        for _ in range(SETTLE_TICKS):
            await asyncio.sleep(0)

    async def play(self, seconds: float) -> None:
        """Move the fake clock on by ``seconds``: each timer fires at its time, then the loop settles."""
        clock = self.clock
        end = clock.t + seconds
        await self.settle()
        while True:
            due = clock.next_due()
            if due is None or due > end:
                break
            clock.advance(max(0.0, due - clock.t))
            await self.settle()
        clock.advance(max(0.0, end - clock.t))
        await self.settle()

    async def finish(self, call: Call, within: float = 60.0) -> dict[str, Any]:
        """Play until ``call`` has ended (at most ``within`` fake seconds); its access-log record."""
        step = 0.01
        waited = 0.0
        await self.settle()
        while not call.task.done() and waited < within:
            await self.play(step)
            waited += step
        assert call.task.done(), f"the exchange did not end within {within} s of fake time"
        call.task.result()
        assert call.record is not None
        return call.record
