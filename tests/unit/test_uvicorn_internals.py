"""gateway/api/protocol.py subclasses uvicorn's private ``HttpToolsProtocol``: pin what it relies on.

uvicorn is bounded above in pyproject.toml to the versions this was checked against; this test drives
the real protocol class with a request and a lost connection, so a uvicorn that renamed what we use
fails here, by name, before it fails in production.
"""

from __future__ import annotations

import asyncio
import re
import socket
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httptools
from packaging.requirements import Requirement
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.api.protocol import DISCONNECT_KEY, SCOPE_KEY, TimedHttpToolsProtocol

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_uvicorn_is_within_the_bound_the_protocol_was_checked_against() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if re.match(r"uvicorn\b", d)]
    assert any(s.operator == "<" for s in spec.specifier), (
        "uvicorn needs an upper bound: protocol.py uses its internals"
    )
    assert spec.specifier.contains(version("uvicorn")), (
        f"uvicorn {version('uvicorn')} is outside {spec.specifier}"
    )


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, parts: Any) -> None:
        self.written.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_buffer_limits = (high, low)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_the_protocol_stamps_the_scope_and_reports_a_disconnect_through_uvicorns_internals() -> None:
    async def scenario() -> None:
        seen: dict[str, Any] = {}
        gone = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            seen.update(scope)
            scope[DISCONNECT_KEY] = gone.set  # what the edge does
            await asyncio.sleep(3600)  # the client leaves before the answer

        config = Config(
            app, http=TimedHttpToolsProtocol, lifespan="off", access_log=False, log_level="warning"
        )
        config.load()
        proto = TimedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        proto.connection_made(transport)
        proto.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}")
        for _ in range(10):
            await asyncio.sleep(0)
        assert isinstance(seen.get(SCOPE_KEY), float)  # on_message_begin ran, and self.scope is the request's
        assert proto.cycle is not None and proto.cycle.response_complete is False
        proto.connection_lost(None)
        assert gone.is_set()  # connection_lost found the hook through self.cycle.scope
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()

    asyncio.run(scenario())


def _protocol() -> TimedHttpToolsProtocol:
    """The protocol, not connected yet, serving an app that never answers (inside a running loop)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    config = Config(app, http=TimedHttpToolsProtocol, lifespan="off", access_log=False, log_level="warning")
    config.load()
    return TimedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})


def _connected_protocol() -> TimedHttpToolsProtocol:
    """The protocol on a fake socket, serving an app that never answers (inside a running loop)."""
    proto = _protocol()
    proto.connection_made(_Transport())
    return proto


def test_the_protocols_write_pause_hooks_still_reach_uvicorns_flow_control() -> None:
    """server.send_timeout_s times how long writing stays paused by overriding uvicorn's
    ``pause_writing``/``resume_writing``: they must still be the transport's callbacks and still pause
    uvicorn's own flow control (a send waits while paused)."""

    async def scenario() -> None:
        proto = _connected_protocol()
        proto.pause_writing()
        assert proto.delivery.send_blocked_t > 0 and proto.flow.write_paused
        proto.resume_writing()
        assert proto.delivery.send_blocked_t == 0.0 and not proto.flow.write_paused
        # server.request_timeout_s does not count time uvicorn itself stopped reading a body (the app
        # had not taken what it buffered): it reads flow.read_paused
        assert proto.flow.read_paused is False
        proto.flow.pause_reading()
        assert proto.flow.read_paused is True

    asyncio.run(scenario())


def test_a_response_sent_whole_while_writing_is_paused_waits_on_uvicorns_flow_control() -> None:
    """The engine asks the connection's ``Delivery`` whether a response sent whole (which uvicorn calls
    complete at once) left: it waits on uvicorn's ``flow.drain()``, which ``resume_writing`` and
    ``connection_lost`` end."""

    async def scenario() -> None:
        proto = _connected_protocol()
        proto.pause_writing()
        waiting = asyncio.ensure_future(proto.delivery.delivered())
        await asyncio.sleep(0)
        assert not waiting.done()
        proto.resume_writing()
        assert await waiting is True  # it left
        proto.pause_writing()
        waiting = asyncio.ensure_future(proto.delivery.delivered())
        await asyncio.sleep(0)
        proto.connection_lost(ConnectionResetError())  # the client reset it, the end still unsent
        assert await waiting is False

    asyncio.run(scenario())


def test_writing_is_paused_while_any_byte_of_a_response_waits_in_the_gateway() -> None:
    """The delivery wait and server.send_timeout_s read uvicorn's pause and resume, which the transport's
    write-buffer marks decide: with the defaults (64 KiB, 16 KiB) a response whose last 64 KiB the kernel
    could not take waited in the gateway unseen and untimed, and one resumed with 16 KiB still there
    counted as delivered. At zero, paused means a byte waits, resumed that none does."""

    async def scenario() -> None:
        proto = _protocol()
        ours, theirs = socket.socketpair()
        with theirs:  # a real socket: the marks are asyncio's transport's own
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, ours)
            assert transport.get_write_buffer_limits() == (0, 0)
            transport.close()

    asyncio.run(scenario())


def test_the_parsers_upgrade_flag_is_set_when_on_headers_complete_runs() -> None:
    """protocol.py looks for an Upgrade to refuse only in heads httptools flags (``parser.should_upgrade()``,
    as uvicorn's own ``on_headers_complete`` does): llhttp must set the flag before that callback, and only
    for an Upgrade that Connection names (or CONNECT)."""
    seen: list[bool] = []

    class Callbacks:
        def on_headers_complete(self) -> None:
            seen.append(parser.should_upgrade())

    for head in (
        b"GET / HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\ncontent-length: 2\r\n\r\n{}",
        b"GET / HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
    ):
        parser = httptools.HttpRequestParser(Callbacks())
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
    assert seen == [True, True, False, False]


def test_a_parser_error_still_reaches_send_400_response() -> None:
    """protocol.py answers unparseable bytes (DPE) by overriding ``send_400_response``: uvicorn's
    ``data_received`` must still call it on a parser error."""

    async def scenario() -> None:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            raise AssertionError("no request was parsed")

        config = Config(
            app, http=TimedHttpToolsProtocol, lifespan="off", access_log=False, log_level="critical"
        )
        config.load()
        proto = TimedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        called: list[str] = []
        proto.send_400_response = called.append  # type: ignore[method-assign]
        proto.connection_made(_Transport())
        proto.data_received(b"\x16\x03\x01 not http\r\n\r\n")
        assert len(called) == 1

    asyncio.run(scenario())
