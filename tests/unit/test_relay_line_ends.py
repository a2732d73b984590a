"""Streams as the SSE spec allows them, not only as OpenAI writes them: lines may end in LF, CRLF or CR (and
an event's blank line in any of them), and an event may arrive in pieces far apart. The first token is found,
each event goes out when it is whole, and idle_ms is the provider's silence, not the wait for an event's end.
On the fake clock of scripted_upstream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from scripted_upstream import Playbook, Reply, play

TIMEOUTS = {"ttft_ms": 3000, "per_try_ms": 60000, "idle_ms": 1000}


def _event(text: str, line_end: bytes, blank: bytes) -> bytes:
    data = orjson.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})
    return b"data: " + data + line_end + blank


def _relay(reply: Reply) -> tuple[list[tuple[float, bytes]], dict[str, Any]]:
    """(fake seconds after the request each body message was sent, its bytes), and the access-log record."""

    async def scenario() -> tuple[list[tuple[float, bytes]], dict[str, Any]]:
        pb = Playbook(
            [{"name": "m", "deployments": ["a"], "timeouts": TIMEOUTS, "retry": {"max_retries": 0}}],
            lambda req: reply,
        )
        sent: list[tuple[float, bytes]] = []
        t0 = pb.clock.now()
        call = pb.call("m", stream=True)
        down_send = call.down.send

        async def stamped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message["body"]:
                sent.append((round(pb.clock.now() - t0, 3), message["body"]))
            await down_send(message)

        call.down.send = stamped  # type: ignore[method-assign]
        rec = await pb.finish(call)
        return sent, rec

    return play(scenario)


@pytest.mark.parametrize(
    ("line_end", "blank"),
    [(b"\n", b"\r\n"), (b"\r", b"\r"), (b"\r\n", b"\n"), (b"\r", b"\r\n")],
    ids=["LF+CRLF", "CR+CR", "CRLF+LF", "CR+CRLF"],
)
def test_every_line_end_the_spec_allows_finds_the_first_token_and_relays_each_event_as_it_ends(
    line_end: bytes, blank: bytes
) -> None:
    events = [_event(w, line_end, blank) for w in ("one", "two", "three")]
    sent, rec = _relay(Reply.stream(*((0.5, e) for e in events)))
    assert b"".join(body for _, body in sent) == b"".join(events)
    # each event when it arrived (0.5 s apart): never held until the next one, never cut by idle_ms
    assert [(t, body) for t, body in sent] == [(0.5, events[0]), (1.0, events[1]), (1.5, events[2])]
    assert (rec["response_code"], rec["response_flags"], rec["ttft_ms"] is not None) == (200, "-", True)
    assert rec["upstream_service_time_ms"] == pytest.approx(1500, abs=1)


def test_an_event_trickling_in_is_no_silence() -> None:
    """A provider that sends an event in pieces 0.4 s apart is never silent for idle_ms (1 s)."""
    first = _event("one", b"\n", b"\n")
    slow = _event("two" * 20, b"\n", b"\n")
    pieces = [slow[i : i + 12] for i in range(0, len(slow), 12)]
    assert len(pieces) * 0.4 > 2 * TIMEOUTS["idle_ms"] / 1000  # the whole event takes longer than idle_ms
    sent, rec = _relay(Reply.stream((0.0, first), *((0.4, p) for p in pieces)))
    assert [body for _, body in sent] == [first, slow]  # the slow event whole, once it ended
    assert (rec["response_code"], rec["response_flags"], rec["timeout_flag"]) == (200, "-", None)


def test_a_provider_silent_mid_event_for_idle_ms_is_still_cut() -> None:
    first = _event("one", b"\n", b"\n")
    sent, rec = _relay(Reply.stream((0.0, first), (0.4, b'data: {"cho'), stall=True))
    assert sent[0][1] == first
    error = orjson.loads(sent[-1][1].split(b"data: ", 1)[1])
    assert (
        "idle_ms=1000" in error["error"]["message"]
        and "unfinished event (11 bytes)" in error["error"]["message"]
    )
    assert sent[-1][0] == pytest.approx(1.4, abs=0.05)  # 1 s after the last byte, not after the last event
    assert (rec["response_flags"], rec["timeout_flag"]) == ("UT", "idle")
