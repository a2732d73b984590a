"""The leanest Python gateway this benchmark knows: what Python itself costs per proxied request.

uvloop and httptools on both sides, no ASGI, no tasks, no coroutines: parser callbacks write to the
other side directly. Per request it still does what any gateway must: parses the JSON body and
rewrites the model, takes a kept-alive upstream connection from a pool, relays the response as it
arrives (a chunked stream re-framed chunk by chunk) and writes one JSON access-log line. No routing,
retries, timeouts, limits, metrics or error handling: a reference point for the benchmark, not a
proxy to run. Started by loadtests/bench.py as target ``lean`` with the shared bench's python.

    python loadtests/lean_proxy.py --port 9000 --upstream http://127.0.0.1:9001/v1 --log lean.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the provider; back in the pool when its response has ended."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpResponseParser(self)
        self.down: Downstream | None = None
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = None
        self.headers: list[bytes] = []
        self.chunked = False
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def send(self, down: Downstream, head: bytes, body: bytes) -> None:
        self.down, self.headers, self.sent = down, [], 0
        assert self.transport is not None
        self.transport.writelines((head, body))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(b"%s: %s\r\n" % (name, value))
        if name.lower() == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.head = b"HTTP/1.1 %d OK\r\n%s\r\n" % (status, b"".join(self.headers))

    def on_body(self, data: bytes) -> None:
        assert self.down is not None
        self.sent += len(data)
        if self.chunked:  # httptools hands over the chunk's data: frame it again
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.head is not None:  # the head leaves with the first bytes of the body
            data, self.head = self.head + data, None
        self.down.write(data)

    def on_message_complete(self) -> None:
        down = self.down
        assert down is not None
        tail = self.head or b""
        if self.chunked:
            tail += b"0\r\n\r\n"
        if tail:
            down.write(tail)
        self.down, self.head, self.chunked = None, None, False
        self.proxy.pool.append(self)
        self.proxy.log(down, self.parser.get_status_code(), self.sent)


class Downstream(asyncio.Protocol):
    """One client connection: a request is parsed, its body rewritten and sent upstream."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.t0 = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def on_message_begin(self) -> None:
        self.t0 = time.perf_counter()
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.url == b"/health":
            self.write(HEALTH)
            return
        request = orjson.loads(b"".join(self.body))
        request["model"] = self.proxy.model
        body = orjson.dumps(request)
        head = self.proxy.head % len(body)
        if self.proxy.pool:
            self.proxy.pool.pop().send(self, head, body)
        else:
            asyncio.ensure_future(self.proxy.connect(self, head, body))


class Proxy:
    def __init__(self, upstream: str, model: str, log_path: str) -> None:
        u = urlsplit(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.model = model
        self.head = (
            f"POST {u.path.rstrip('/')}/chat/completions HTTP/1.1\r\nhost: {u.netloc}\r\n"
            "content-type: application/json\r\nauthorization: Bearer sk-bench\r\n"
        ).encode() + b"content-length: %d\r\n\r\n"
        self.pool: list[Upstream] = []
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def connect(self, down: Downstream, head: bytes, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        up.send(down, head, body)

    def log(self, down: Downstream, status: int, sent: int) -> None:
        line = {
            "start_time": time.time(),
            "path": down.url.decode("latin-1"),
            "response_code": status,
            "bytes_sent": sent,
            "duration_ms": (time.perf_counter() - down.t0) * 1000.0,
        }
        os.write(self.log_fd, orjson.dumps(line) + b"\n")


async def serve(a: argparse.Namespace) -> None:
    proxy = Proxy(a.upstream, a.model, a.log)
    server = await asyncio.get_running_loop().create_server(lambda: Downstream(proxy), "127.0.0.1", a.port)
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the provider's base URL, .../v1")
    p.add_argument("--model", default="mock-model", help="the model name sent upstream")
    p.add_argument("--log", required=True, help="access-log file (JSON lines)")
    uvloop.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
