"""The work the gateway does per proxied request, counted, against a committed budget: a CI guard that
cannot flake, unlike a timed test.

The app is built in-process and driven through its ASGI interface (no client socket); simulated
providers listen on loopback in the same event loop. After a warm-up, a trace hook counts the
Python function calls and bytecode instructions run in ``gateway/`` (the simulator excluded) for N
identical requests: proxies for CPU that do not depend on the machine, its load or its clock. The
server's part (``protocol``) is counted apart: the real protocol class on a fake socket, serving the
same request head to an app that is not gateway code.

Resuming a suspended coroutine is not a call, and the instructions of an ``await`` loop are not
counted: how often a coroutine suspends depends on when bytes arrive, which is timing, not work.
The access-log writer thread is not counted (the hook is per thread); its batch handoff on the loop is.
The count is of the source as the interpreter runs it: a trace hook sees nothing of the compiled build
(LLMGW_COMPILE=1, setup.py), whose cost loadtests/instr_bench.py counts in machine instructions.

When a budget fails: look at the top contributors in the message. If the growth is wanted (a new
feature on the hot path), raise the budget in the same change and say why; if not, remove the work.
"""

from __future__ import annotations

import asyncio
import dis
import inspect
import os
import sys
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import orjson
import pytest

import gateway
from gateway.api.asgi import GatewayASGI
from gateway.app import build_app
from gateway.config import parse_config
from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer
from gateway.telemetry.accesslog import FLUSH_INTERVAL_S

# Per request, measured on CPython 3.11 (the project's target; bytecode counts move between Python
# versions). Calls are exact from run to run; instructions vary by about 2 in 4,500 because latency
# routing between two deployments picks by measured latency. Budgets leave ~8-12 % headroom.
# Metrics and deadlines are gateway code since they replaced prometheus_client's locked values and
# per-request loop timers (telemetry.metrics, engine.alarms), and so is the upstream HTTP client since
# upstream.h1 replaced aiohttp's: they count here now, and cost less in all.
# The Host check (auth none: DNS rebinding) costs a known host one set lookup, inline: 0 calls, ~15 instructions.
BUDGET = {
    "json": {"calls": 186, "instructions": 6350},  # measured: 177 calls, 5,973 instructions
    "stream": {"calls": 193, "instructions": 6600},  # measured: 183 calls, 6,202 instructions
    # The server's side, around the app: api/protocol.py under uvicorn, edge limits on. An Upgrade check
    # that scanned every head's headers in Python cost 148 of 384 instructions before the parser's own
    # flag gated it.
    "protocol": {"calls": 10, "instructions": 270},  # measured: 9 calls, 243 instructions
}
WARMUP = 5
MEASURED = 20

_PKG = str(Path(gateway.__file__).parent) + os.sep
_SIM = _PKG + "sim" + os.sep
_CO_RESUMABLE = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
)
_RESUME = dis.opmap["RESUME"]
# The instructions of an ``await`` that repeat once per suspension: how often depends on timing, not work.
_AWAIT_LOOP = frozenset(dis.opmap[n] for n in ("SEND", "YIELD_VALUE", "RESUME", "JUMP_BACKWARD_NO_INTERRUPT"))


class WorkCounter:
    """A ``sys.settrace`` hook counting, per gateway function, fresh calls and bytecode instructions run.

    Calls see new functions on the path; instructions also see loops and inline work growing."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.instructions: Counter[str] = Counter()
        self._scope: dict[CodeType, tuple[str, bytes, bool] | None] = {}

    def _classify(self, code: CodeType) -> tuple[str, bytes, bool] | None:
        path = code.co_filename
        if not path.startswith(_PKG) or path.startswith(_SIM):
            return None
        name = f"{path[len(_PKG) : -3].replace(os.sep, '.')}:{code.co_qualname}"
        return name, code.co_code, bool(code.co_flags & _CO_RESUMABLE)

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        # the global hook: sees every "call" event (fresh calls and coroutine resumptions alike)
        code = frame.f_code
        try:
            info = self._scope[code]
        except KeyError:
            info = self._scope[code] = self._classify(code)
        if info is None:
            return None
        name, co_code, resumable = info
        i = frame.f_lasti
        # a coroutine's fresh start sits on RESUME 0; a resumption on RESUME 1-3
        if not resumable or (co_code[i] == _RESUME and co_code[i + 1] == 0):
            self.calls[name] += 1
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            name, co_code, _ = self._scope[frame.f_code]  # type: ignore[misc]  # only gateway frames get here
            if co_code[frame.f_lasti] not in _AWAIT_LOOP:
                self.instructions[name] += 1
        return self._local


def _config(sim_a: int, sim_b: int, log_path: Path) -> Any:
    """Everything a production config turns on for the hot path: latency routing over two deployments,
    retries with a budget, hedging (its delay never fires here, so the count does not depend on timing),
    JSON access log, metrics."""
    quiet_pool = {"min_connections": 1, "keepwarm_interval_s": 0}
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "access_log": {"path": str(log_path), "format": "json"},
            "models": [
                {
                    "name": "chat",
                    "routing": {"strategy": "latency"},
                    "retry": {"max_retries": 2, "budget_percent": 20},
                    "hedging": {"enabled": True, "delay_ms": 60_000, "max_delay_ms": 60_000},
                    "deployments": [
                        {
                            "id": "a",
                            "base_url": f"http://127.0.0.1:{sim_a}/v1",
                            "api_key": "k",
                            "model": "sim-large",
                            "region": "us-east",
                            "pool": quiet_pool,
                        },
                        {
                            "id": "b",
                            "base_url": f"http://127.0.0.1:{sim_b}/v1",
                            "api_key": "k",
                            "model": "sim-large",
                            "region": "us-east",
                            "pool": quiet_pool,
                        },
                    ],
                }
            ],
        },
        env={},
    )


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 50123),
        "server": ("127.0.0.1", 8080),
        "headers": [
            (b"host", b"127.0.0.1:8080"),  # what an SDK sends: a name would meet the Host check
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"authorization", b"Bearer client-key"),
            (b"user-agent", b"work-budget/1.0"),
            (b"accept", b"*/*"),
        ],
    }


async def _request(app: Any, body: bytes) -> tuple[int, bytes]:
    """One request through the ASGI interface, as uvicorn would make it."""
    done = asyncio.Event()
    body_sent = False
    status = 0
    parts: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        else:
            parts.append(msg.get("body", b""))
            if not msg.get("more_body"):
                done.set()

    await app(_scope(body), receive, send)
    return status, b"".join(parts)


def _body(stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": "chat",
            "stream": stream,
            "temperature": 0.2,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hello."},
            ],
        }
    )


async def count_requests(app: Any, body: bytes) -> tuple[WorkCounter, int, bytes]:
    """Warm up, then count the gateway work of MEASURED identical requests; the last one's status and body."""
    for _ in range(WARMUP):  # caches, metric children, pooled connections
        status, out = await _request(app, body)
        assert status == 200, out
    await asyncio.sleep(FLUSH_INTERVAL_S * 2)
    counter = WorkCounter()
    previous = sys.gettrace()
    sys.settrace(counter)
    try:
        for _ in range(MEASURED):
            status, out = await _request(app, body)
            # the access-log batch handoff runs on a timer: let it fire once per request
            await asyncio.sleep(FLUSH_INTERVAL_S * 1.5)
    finally:
        sys.settrace(previous)
    return counter, status, out


async def _measure(tmp: Path) -> dict[str, WorkCounter]:
    profile = SimProfile()
    profile.update({"ttft_ms": 0, "ttft_dist": "fixed", "itl_ms": 0, "tokens": 8, "tail_p": 0})
    sims = [SimServer(profile, name=n, region="us-east", seed=0) for n in ("sim-a", "sim-b")]
    for s in sims:
        await s.start()
    app = build_app(_config(sims[0].port, sims[1].port, tmp / "access.jsonl"), seed=0)
    assert isinstance(app, GatewayASGI)  # tracing and CORS off: nothing wraps the hot path
    await app.lifecycle.start()  # what the ASGI lifespan does, without installing signal handlers
    counts: dict[str, WorkCounter] = {}
    try:
        for kind, stream in (("json", False), ("stream", True)):
            counter, status, out = await count_requests(app, _body(stream))
            assert status == 200 and (b"[DONE]" in out if stream else b'"choices"' in out), out
            counts[kind] = counter
        counts["protocol"] = await _measure_protocol()
    finally:
        await app.lifecycle.stop()
        for s in sims:
            await s.stop()
    return counts


class _Socket(asyncio.Transport):
    """The client's socket as the protocol sees it: writes are kept, nothing blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def writelines(self, parts: Any) -> None:
        for p in parts:
            self.out += p

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50123), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _measure_protocol() -> WorkCounter:
    """The protocol's own work (api/protocol.py: the head bounds, the first-byte stamp, the upgrade check)
    for requests on one keep-alive connection, the edge limits on; the app answers at once and is not
    gateway code, so only the protocol counts."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.api.edge import EDGE_KEY, EdgeLimits
    from gateway.api.protocol import TimedHttpToolsProtocol

    answer = b'{"ok":true}'
    answered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": answer})
        answered.set()

    body = _body(False)
    head = b"".join(b"%s: %s\r\n" % kv for kv in _scope(body)["headers"])
    request = b"POST /v1/chat/completions HTTP/1.1\r\n" + head + b"\r\n" + body
    srv = _config(1, 2, Path(os.devnull)).server
    edge = EdgeLimits(srv, lambda *_: None, lambda _: None)
    config = Config(app, lifespan="off", access_log=False, log_level="warning")
    config.load()
    proto = TimedHttpToolsProtocol(config, ServerState(), {EDGE_KEY: edge}, _loop=asyncio.get_running_loop())
    sock = _Socket()
    proto.connection_made(sock)

    async def one() -> None:
        answered.clear()
        proto.data_received(request)
        await answered.wait()
        await asyncio.sleep(0)  # the held head's flush, if any

    for _ in range(WARMUP):
        await one()
    counter = WorkCounter()
    previous = sys.gettrace()
    sys.settrace(counter)
    try:
        for _ in range(MEASURED):
            await one()
    finally:
        sys.settrace(previous)
    assert sock.out.count(b"HTTP/1.1 200 ") == WARMUP + MEASURED
    proto.connection_lost(None)
    return counter


def _top(counts: Counter[str], n: int = 12) -> str:
    by_module: Counter[str] = Counter()
    for name, c in counts.items():
        by_module[name.split(":")[0]] += c
    return (
        "by function:\n"
        + "\n".join(f"  {c / MEASURED:9.1f}  {name}" for name, c in counts.most_common(n))
        + "\nby module:\n"
        + "\n".join(f"  {c / MEASURED:9.1f}  {m}" for m, c in by_module.most_common(8))
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WorkCounter]:
    return asyncio.run(_measure(tmp_path_factory.mktemp("work-budget")))


@pytest.mark.parametrize("kind", ["json", "stream", "protocol"])
@pytest.mark.parametrize("unit", ["calls", "instructions"])
def test_work_per_request_stays_within_budget(measured: dict[str, WorkCounter], kind: str, unit: str) -> None:
    counts: Counter[str] = getattr(measured[kind], unit)
    per_request = sum(counts.values()) / MEASURED
    budget = BUDGET[kind][unit]
    assert per_request <= budget, (
        f"{kind} request: {per_request:.1f} {unit} in gateway code per request, over the budget of {budget} "
        f"(Python {sys.version_info.major}.{sys.version_info.minor}). "
        f"Top contributors ({unit} per request), {_top(counts)}"
    )
    # a floor too: a counter that stopped seeing gateway code would pass every budget
    assert per_request >= budget / 2, (
        f"{kind} request: {per_request:.1f} {unit} per request, under half the budget of {budget}: lower the "
        f"budget to keep the guard tight (or check the counter still sees gateway code). {_top(counts)}"
    )
