"""Providers scripted in raw bytes: an asyncio server in a background thread, one script per case.

A gateway under test points each deployment at ``RawProvider.base_url(case)``; the first request on
a connection names the case by its path, and that case's script then owns the connection (it may
answer, answer twice, hang, or hang up). The provider remembers every connection and request per
case, so a test can tell whether a connection was reused and what each request got.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    line: bytes
    headers: dict[bytes, bytes]
    body: bytes
    connection: int  # the case's connection number it came on


@dataclass
class CaseLog:
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what scripts noted ("closed", ...), in order


class Conn:
    """One accepted connection as a script sees it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int, log: CaseLog
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.number = number
        self._log = log

    async def read_request(self, head: bytes | None = None) -> Request:
        """The next request on this connection (IncompleteReadError when the gateway hung up)."""
        if head is None:
            head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(b":", 1) for ln in lines[1:] if ln)}
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        req = Request(lines[0], headers, body, self.number)
        self._log.requests.append(req)
        return req

    def note(self, what: str) -> None:
        self._log.notes.append(what)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Hang up with a TCP reset (RST), not a clean close (FIN): SO_LINGER 0, then abort."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True once the gateway closed this connection (reads to EOF, discarding what it sends)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:  # a reset: the gateway closed with bytes of ours unread
            return True
        return True


Script = Callable[[Conn, Request], Awaitable[None]]


class RawProvider:
    """Serves the scripts in ``cases`` (name -> script) on one loopback port from a daemon thread."""

    def __init__(self, cases: dict[str, Script]) -> None:
        self.cases = cases
        self.logs: dict[str, CaseLog] = {name: CaseLog() for name in cases}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="raw-provider", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError("raw provider did not start")

    def base_url(self, case: str) -> str:
        return f"http://127.0.0.1:{self.port}/{case}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._on_conn, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        case = head.split(b" ", 2)[1].split(b"/")[1].decode()
        log = self.logs[case]
        conn = Conn(reader, writer, log.connections, log)
        log.connections += 1
        try:
            await self.cases[case](conn, await conn.read_request(head))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def response(
    status: bytes | str, headers: list[tuple[str, str]] | None = None, body: bytes = b"", length: bool = True
) -> bytes:
    """One HTTP/1.1 response in bytes; ``status`` is the status line after the version ("200 OK")."""
    if isinstance(status, str):
        status = status.encode()
    head = b"HTTP/1.1 " + status + b"\r\n"
    for k, v in headers or []:
        head += f"{k}: {v}\r\n".encode("latin-1")
    if length:
        head += b"content-length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def completion(content: str = "hello", rid: str = "chatcmpl-raw") -> bytes:
    """A chat completion body (non-stream) with usage."""
    return (
        b'{"id":"%s","object":"chat.completion","created":1,"model":"raw","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"%s"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    ) % (rid.encode(), content.encode())


def sse_events(content: str = "hello") -> bytes:
    """A small chat completion stream: role chunk, one content chunk per word, finish, usage, [DONE]."""
    out = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    for word in content.split(" "):
        out += (
            b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
            % word.encode()
        )
    out += b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    out += b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    return out + b"data: [DONE]\n\n"
