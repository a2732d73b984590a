"""The transport that sends a response's head together with its first body bytes."""

from __future__ import annotations

import pytest

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

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.write_buffer_limits = (high, low)


class RecordingEdge:
    def __init__(self, max_head_bytes: int, max_headers: int = 100, max_connections: int = 0) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_connections = max_connections
        self.connections: set = set()
        self.refused: list = []
        self.flags: list[str | None] = []
        self.bytes_sent: list[int] = []
        self.limits: list[str] = []

    def on_refused(self, err, method, path, client, started, bytes_sent) -> None:
        self.refused.append((err.status, method, path))
        self.flags.append(err.flag)
        self.bytes_sent.append(bytes_sent)

    def on_limit(self, limit: str) -> None:
        self.limits.append(limit)


def _protocol(edge: RecordingEdge, before_answer=None):
    """The real protocol on a fake socket, serving an app that records each request's scope, awaits
    ``before_answer(scope, receive)`` if given, then answers 204."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.api.edge import EDGE_KEY
    from gateway.api.protocol import TimedHttpToolsProtocol

    started: list[dict] = []

    async def app(scope, receive, send) -> None:
        started.append(scope)
        if before_answer is not None:
            await before_answer(scope, receive)
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


# Refused bytes while a request is in flight lean on more of uvicorn: the cycle's ``more_body``,
# ``response_started``/``response_complete``, ``disconnected`` and ``message_event``, the ``pipeline``
# deque, and ``on_response_complete`` being called when a response is complete.

CHUNKED_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
VALID = b"POST /v1/a HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"


def _responses(raw: FakeSocketTransport) -> list[bytes]:
    """The status lines of what was written, in order."""
    return [line for line in b"".join(raw.sends).split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def _invalid_http_body() -> int:
    from gateway.api.edge import malformed_http

    return len(malformed_http().body())


def test_a_malformed_chunk_of_the_body_being_read_is_answered_at_once_and_ends_that_request():
    from gateway.api.protocol import REFUSED_KEY

    got: list[dict] = []

    async def read_body(scope, receive) -> None:
        while True:
            msg = await receive()
            got.append(msg)
            if msg["type"] != "http.request" or not msg["more_body"]:
                return

    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, started, loop = _protocol(edge, read_body)
    proto.data_received(CHUNKED_HEAD + b"2\r\n{}\r\n")
    _turns(loop)
    assert got == [{"type": "http.request", "body": b"{}", "more_body": True}]  # waiting for more
    proto.data_received(b"zz\r\n")
    _turns(loop)
    assert got[-1] == {"type": "http.disconnect"} and started[0][REFUSED_KEY] is True
    # the 400, and not the app's 204 after it (its sends are dropped)
    assert _responses(raw) == [b"HTTP/1.1 400 Bad Request"] and raw.eof and not raw.reading
    assert edge.refused == [(400, "POST", "/v1/chat/completions")] and edge.limits == ["malformed_http"]
    assert edge.bytes_sent == [_invalid_http_body()]
    _finish(loop)


def _held_then_released(edge: RecordingEdge, data: bytes):
    """A protocol whose app holds each request until released; ``data`` is fed, then the first request
    released. Returns the protocol's parts and whether the bytes waited (nothing written, reading paused,
    nothing refused yet)."""
    import asyncio

    release: list[asyncio.Future] = []

    async def hold(scope, receive) -> None:
        release.append(asyncio.get_running_loop().create_future())
        await release[-1]

    proto, raw, started, loop = _protocol(edge, hold)
    proto.data_received(data)
    _turns(loop)
    waited = len(started) == 1 and raw.sends == [] and not raw.reading and edge.refused == []
    release[0].set_result(None)
    _turns(loop)
    return proto, raw, started, loop, waited


def test_bytes_refused_behind_a_complete_request_are_answered_after_its_response():
    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, started, loop, waited = _held_then_released(
        edge, VALID + b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n"
    )
    assert waited
    assert _responses(raw) == [b"HTTP/1.1 204 No Content", b"HTTP/1.1 400 Bad Request"] and raw.eof
    assert proto.timeout_keep_alive_task is None  # not kept alive: closing
    assert edge.refused == [(400, "-", "-")] and edge.bytes_sent == [_invalid_http_body()]
    _finish(loop)


def _head_with(n: int) -> bytes:
    lines = b"".join(b"x-h%d: v\r\n" % i for i in range(n - 1))
    return b"POST /v1/chat/completions HTTP/1.1\r\n" + lines + b"content-length: 2\r\n\r\n{}"


def test_a_head_with_more_headers_than_the_limit_is_refused_before_the_app_starts():
    from gateway.api.edge import too_many_headers

    edge = RecordingEdge(max_head_bytes=4096, max_headers=8)
    proto, raw, started, loop = _protocol(edge)
    proto.data_received(_head_with(9))
    _turns(loop)
    assert started == []  # uvicorn never started the request: the parser stopped at the head's end
    assert (
        _responses(raw) == [b"HTTP/1.1 431 Request Header Fields Too Large"] and raw.eof and not raw.reading
    )
    assert b'"code":"too_many_headers"' in b"".join(raw.sends)
    assert edge.refused == [(431, "POST", "/v1/chat/completions")] and edge.limits == ["too_many_headers"]
    assert edge.bytes_sent == [len(too_many_headers(8).body())]
    _finish(loop)


def test_a_head_with_as_many_headers_as_the_limit_is_served_and_so_is_the_next():
    edge = RecordingEdge(max_head_bytes=4096, max_headers=8)
    proto, raw, started, loop = _protocol(edge)
    proto.data_received(_head_with(8))
    _turns(loop)
    proto.data_received(_head_with(8))
    _turns(loop)
    assert len(started) == 2 and _responses(raw) == [b"HTTP/1.1 204 No Content"] * 2
    assert edge.refused == [] and edge.limits == []
    _finish(loop)


def test_too_many_headers_behind_a_complete_request_are_answered_after_its_response():
    edge = RecordingEdge(max_head_bytes=4096, max_headers=8)
    proto, raw, started, loop, waited = _held_then_released(edge, VALID + _head_with(9))
    assert waited and len(started) == 1
    assert _responses(raw) == [b"HTTP/1.1 204 No Content", b"HTTP/1.1 431 Request Header Fields Too Large"]
    assert edge.refused == [(431, "POST", "/v1/chat/completions")] and edge.limits == ["too_many_headers"]
    _finish(loop)


def test_a_connection_over_the_limit_is_answered_503_and_closed_unread_and_a_freed_place_is_taken_again():
    edge = RecordingEdge(max_head_bytes=4096, max_connections=2)
    first, _, _, loop1 = _protocol(edge)
    _, _, _, loop2 = _protocol(edge)
    over, raw, started, loop3 = _protocol(edge)
    assert len(edge.connections) == 2 and over not in edge.connections
    assert _responses(raw) == [b"HTTP/1.1 503 Service Unavailable"] and raw.eof and not raw.reading
    assert b'"code":"too_many_connections"' in b"".join(raw.sends)
    over.data_received(VALID)  # read before reading paused: dropped
    _turns(loop3)
    assert started == [] and edge.limits == ["max_connections"] and edge.refused == []  # counted, not logged
    first.connection_lost(None)
    _, raw4, started4, loop4 = _protocol(edge)
    assert raw4.sends == [] and raw4.reading and len(edge.connections) == 2
    for loop in (loop1, loop2, loop3, loop4):
        _finish(loop)


def test_a_pipelined_request_whose_body_is_refused_never_runs_and_its_answer_waits_its_turn():
    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, started, loop, waited = _held_then_released(edge, VALID + CHUNKED_HEAD + b"zz\r\n")
    assert waited
    assert len(started) == 1  # the refused one was dropped from uvicorn's pipeline
    assert _responses(raw) == [b"HTTP/1.1 204 No Content", b"HTTP/1.1 400 Bad Request"] and raw.eof
    assert edge.refused == [(400, "POST", "/v1/chat/completions")]
    _finish(loop)


def test_a_refusal_waiting_for_a_response_is_logged_once_if_the_client_leaves_first():
    import asyncio

    async def hold(scope, receive) -> None:
        await asyncio.sleep(3600)

    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, _, loop = _protocol(edge, hold)
    proto.data_received(VALID + b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n")
    _turns(loop)
    proto.connection_lost(None)
    _turns(loop)
    assert raw.sends == [] and edge.refused == [(400, "-", "-")] and edge.bytes_sent == [0]
    for task in asyncio.all_tasks(loop):
        task.cancel()
    _finish(loop)


@pytest.mark.parametrize(("cut", "flags"), [(False, "DPE"), (True, "DPE,DC")], ids=["left", "cut"])
def test_a_refusal_answered_while_writing_is_paused_is_logged_once_it_left_or_dc_if_cut_first(cut, flags):
    """Behind an answer the client does not read, the refusal's answer waits in the gateway too: logged
    when it was written, it said the client got an error it may never get (server.send_timeout_s)."""
    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, _, loop = _protocol(edge)
    proto.pause_writing()  # bytes of an earlier answer still wait to leave
    proto.data_received(b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n")
    _turns(loop)
    assert _responses(raw) == [b"HTTP/1.1 400 Bad Request"] and edge.refused == []  # answered, not logged
    if cut:
        proto.connection_lost(ConnectionResetError())
    else:
        proto.resume_writing()
    _turns(loop)
    assert edge.flags == [flags] and edge.bytes_sent == [_invalid_http_body()]
    _finish(loop)


def _turns(loop) -> None:
    import asyncio

    loop.run_until_complete(asyncio.sleep(0.01))


def _finish(loop) -> None:
    _turns(loop)  # let the app's tasks end
    loop.close()


def test_a_pipelining_client_that_leaves_ends_the_running_request_and_every_queued_one_as_gone():
    """Two requests sent back to back, then the connection closes while the first is in flight: the first is
    told its client left (uvicorn tells only the newest request), and the queued second runs to learn the
    same from receive(), so each ends as a request whose client left instead of writing to a closed socket."""
    import asyncio

    from gateway.api.protocol import DISCONNECT_KEY, client_gone

    told: list[str] = []
    received: list[dict] = []

    async def first_holds(scope, receive) -> None:
        if scope["path"] == "/v1/a":
            scope[DISCONNECT_KEY] = lambda: told.append("first")
            await asyncio.sleep(3600)  # the upstream call: cancelled by the app on that callback
        else:
            received.append(await receive())

    edge = RecordingEdge(max_head_bytes=4096)
    proto, raw, started, loop = _protocol(edge, first_holds)
    second = VALID.replace(b"/v1/a", b"/v1/b")
    proto.data_received(VALID + second)
    _turns(loop)
    assert [s["path"] for s in started] == ["/v1/a"]  # the second waits in uvicorn's pipeline
    proto.connection_lost(None)
    _turns(loop)
    assert told == ["first"]
    assert [s["path"] for s in started] == ["/v1/a", "/v1/b"]
    assert received == [{"type": "http.disconnect"}]
    assert started[1][DISCONNECT_KEY] is client_gone  # a refusal it answers is logged DC (never delivered)
    assert raw.sends == []  # nothing written to the closed connection
    for task in proto.tasks:
        task.cancel()
    _finish(loop)


def test_a_pipelined_request_is_stamped_when_it_starts_and_one_started_at_once_is_not():
    """The wait behind the response before it is the client's queueing: the scope says when it ended."""
    from gateway.api.protocol import SCOPE_KEY, STARTED_KEY

    edge = RecordingEdge(max_head_bytes=4096)
    second = VALID.replace(b"/v1/a", b"/v1/b")
    proto, raw, started, loop, waited = _held_then_released(edge, VALID + second)
    assert waited and [s["path"] for s in started] == ["/v1/a", "/v1/b"]
    first, queued = started
    assert STARTED_KEY not in first
    assert queued[STARTED_KEY] > queued[SCOPE_KEY]  # parsed with the first, started after its response
    _finish(loop)


def _upgrade_answers(edge: RecordingEdge, request: bytes) -> tuple[list[bytes], list[dict]]:
    proto, raw, started, loop = _protocol(edge)
    proto.data_received(request)
    _turns(loop)
    responses = _responses(raw)
    _finish(loop)
    return responses, started


def test_an_upgrade_is_refused_when_the_parser_flags_one_and_the_common_head_is_not_scanned():
    """WebSocket, or h2c with a body: 400 unsupported_upgrade before the app starts. h2c without a body is
    ignored (served), and so is an Upgrade whose Connection does not name it. The parser's own flag picks
    the heads to look at: a plain head never reaches the scan."""
    edge = RecordingEdge(max_head_bytes=4096)
    ws = b"GET /v1/realtime HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n"
    h2c = (
        b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    )
    with_body = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + h2c + b"content-length: 2\r\n\r\n{}"
    assert _upgrade_answers(edge, ws) == ([b"HTTP/1.1 400 Bad Request"], [])
    assert _upgrade_answers(edge, with_body) == ([b"HTTP/1.1 400 Bad Request"], [])
    assert edge.refused == [(400, "GET", "/v1/realtime"), (400, "POST", "/v1/chat/completions")]
    assert edge.limits == ["unsupported_upgrade"] * 2
    for served in (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + h2c + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n",  # Connection does not name it
    ):
        responses, started = _upgrade_answers(edge, served)
        assert responses == [b"HTTP/1.1 204 No Content"] and len(started) == 1, served

    scanned: list[bool] = []
    proto, raw, started, loop = _protocol(edge)
    proto._refuse_upgrade = lambda: scanned.append(True)  # type: ignore[method-assign]
    proto.data_received(VALID)
    _turns(loop)
    assert started and scanned == []  # a head without Upgrade: not scanned
    _finish(loop)
