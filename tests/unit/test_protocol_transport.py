"""The transport that sends a response's head together with its first body bytes."""

from __future__ import annotations

from gateway.api.protocol import HeadWithBodyTransport


class FakeTransport:
    def __init__(self) -> None:
        self.sends: list[bytes] = []  # one entry per send() the kernel would see
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(data)

    def writelines(self, parts) -> None:
        self.sends.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1234) if name == "peername" else default


class FakeLoop:
    def __init__(self) -> None:
        self.soon: list = []

    def call_soon(self, fn) -> None:
        self.soon.append(fn)

    def end_of_turn(self) -> None:
        soon, self.soon = self.soon, []
        for fn in soon:
            fn()


def test_head_and_body_leave_in_one_send_and_later_chunks_alone():
    raw, loop = FakeTransport(), FakeLoop()
    t = HeadWithBodyTransport(raw, loop)
    t.hold_next = True
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert raw.sends == []
    t.write(b"data: 1\n\n")
    t.write(b"data: 2\n\n")
    loop.end_of_turn()  # nothing left to flush
    assert raw.sends == [b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\n", b"data: 2\n\n"]


def test_a_head_alone_goes_out_at_the_end_of_the_loop_turn():
    raw, loop = FakeTransport(), FakeLoop()
    t = HeadWithBodyTransport(raw, loop)
    t.hold_next = True
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a stream whose first chunk is not there yet
    loop.end_of_turn()
    assert raw.sends == [b"HTTP/1.1 200 OK\r\n\r\n"]
    t.write(b"data: 1\n\n")
    assert raw.sends[-1] == b"data: 1\n\n"


def test_close_sends_what_is_held_first_and_the_rest_is_the_transport():
    raw, loop = FakeTransport(), FakeLoop()
    t = HeadWithBodyTransport(raw, loop)
    t.hold_next = True
    t.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
    t.close()
    assert raw.sends == [b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n"] and raw.closed
    assert t.is_closing() and t.get_extra_info("peername") == ("127.0.0.1", 1234)
    loop.end_of_turn()
    assert len(raw.sends) == 1  # the scheduled flush finds nothing held


# ------------------------------------------------------------------ head limits inside uvicorn's protocol
# These drive the real uvicorn protocol subclass with a fake socket: they fail if a uvicorn release
# renames the callbacks or attributes api/protocol.py builds on (pyproject bounds the version too).


class FakeSocketTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.eof = False
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol) -> None:
        pass


class RecordingEdge:
    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.connections: set = set()
        self.refused: list = []
        self.limits: list[str] = []

    def on_refused(self, err, method, path, client, started) -> None:
        self.refused.append((err.status, method, path))

    def on_limit(self, limit: str) -> None:
        self.limits.append(limit)


def _protocol(edge: RecordingEdge):
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.api.edge import EDGE_KEY
    from gateway.api.protocol import TimedHttpToolsProtocol

    started: list[dict] = []

    async def app(scope, receive, send) -> None:
        started.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    loop = asyncio.new_event_loop()
    proto = TimedHttpToolsProtocol(Config(app, lifespan="off"), ServerState(), {EDGE_KEY: edge}, _loop=loop)
    raw = FakeSocketTransport()
    proto.connection_made(raw)  # type: ignore[arg-type]
    return proto, raw, started, loop


def test_a_head_over_the_limit_is_refused_before_the_parser_gets_more_than_the_limit():
    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, started, loop = _protocol(edge)
    proto.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nx-big: ")
    for _ in range(10):  # 10 KiB of one header, 1 KiB at a time
        proto.data_received(b"a" * 1024)
    assert b"".join(raw.sends).startswith(b"HTTP/1.1 431 ") and raw.eof and not raw.reading
    assert edge.refused == [(431, "POST", "/v1/chat/completions")] and edge.limits == ["head_too_large"]
    assert started == []  # the app never saw it
    _finish(loop)


def test_a_small_head_with_a_large_body_in_one_read_passes_and_counting_restarts_per_request():
    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, _, loop = _protocol(edge)
    body = b"x" * 50_000
    request = b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    proto.data_received(request + request[:20])  # a whole request and the start of the next
    assert edge.refused == [] and proto._head_limit == 4096
    proto.data_received(request[20:3000])  # the second head completes within the limit
    assert edge.refused == [] and proto._head_limit == 0  # a body is being read: not counted
    _finish(loop)


def _finish(loop) -> None:
    import asyncio

    loop.run_until_complete(asyncio.sleep(0.01))  # let the app's tasks end
    loop.close()
