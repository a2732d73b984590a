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
