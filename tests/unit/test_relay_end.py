"""How a relayed stream ends: the provider's last bytes and the end of the response go out together when
the client knows the body ended with them (one write instead of two), and as a separate empty message when
it learns of the end only by reading again; either way the client gets every byte, once, and a complete
response, and the provider's connection is released for reuse."""

from __future__ import annotations

from typing import Any

from scripted_upstream import DONE, Playbook, Reply, play, sse

TIMEOUTS = {"ttft_ms": 5000, "per_try_ms": 60000, "idle_ms": 30000}


def _relay(reply: Reply) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """The body messages the client was sent, the access-log record, and whether the provider's
    connection went back to the pool."""

    async def scenario() -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
        pb = Playbook(
            [{"name": "m", "deployments": ["a"], "timeouts": TIMEOUTS, "retry": {"max_retries": 0}}],
            lambda req: reply,
        )
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        bodies = [m for m in call.down.messages if m["type"] == "http.response.body"]
        return bodies, rec, pb.upstream.requests[0].released

    return play(scenario)


def test_the_last_bytes_end_the_response_when_the_body_ended_with_them() -> None:
    chunks = [sse("one"), sse("two"), sse("three") + DONE]
    bodies, rec, released = _relay(Reply.stream(*((0.01, c) for c in chunks), end_with_last=True))
    assert [m["body"] for m in bodies] == chunks
    assert [m["more_body"] for m in bodies] == [True, True, False]  # no empty message at the end
    assert (rec["response_code"], rec["response_flags"], rec["bytes_sent"]) == (
        200,
        "-",
        sum(map(len, chunks)),
    )
    assert released


def test_a_stream_that_arrived_in_one_read_is_one_message() -> None:
    data = sse("one") + sse("two") + DONE
    bodies, rec, released = _relay(Reply.stream((0.01, data), end_with_last=True))
    assert [(m["body"], m["more_body"]) for m in bodies] == [(data, False)]
    assert (rec["response_flags"], rec["bytes_sent"]) == ("-", len(data))
    assert released


def test_an_end_learned_by_reading_again_is_an_empty_final_message() -> None:
    chunks = [sse("one"), sse("two") + DONE]
    bodies, rec, released = _relay(Reply.stream(*((0.01, c) for c in chunks)))
    assert [(m["body"], m["more_body"]) for m in bodies] == [
        (chunks[0], True),
        (chunks[1], True),
        (b"", False),
    ]
    assert (rec["response_flags"], rec["bytes_sent"]) == ("-", sum(map(len, chunks)))
    assert released


def test_an_unfinished_last_event_is_relayed_before_the_end() -> None:
    # no blank line after the last event: held until the body ends, then sent as it came
    chunks = [sse("one"), b"data: [DONE]"]
    bodies, rec, _ = _relay(Reply.stream(*((0.01, c) for c in chunks), end_with_last=True))
    assert b"".join(m["body"] for m in bodies) == b"".join(chunks)
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert rec["response_flags"] == "-"


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'


def test_a_stream_that_ends_without_a_content_token_has_no_ttft() -> None:
    """ttft_ms is the first content token's: a stream of a role chunk and an end (or nothing at all) is
    relayed as it came, with no first token to time."""
    for chunks in ([ROLE + FINISH + DONE], [ROLE, DONE], [b""]):
        _, rec, _ = _relay(Reply.stream(*((0.01, c) for c in chunks), end_with_last=True))
        assert (rec["response_code"], rec["response_flags"], rec["ttft_ms"]) == (200, "-", None), chunks
    _, rec, _ = _relay(Reply.stream((0.01, ROLE), (0.01, sse("hi") + DONE), end_with_last=True))
    assert rec["ttft_ms"] is not None and rec["ttft_ms"] >= 20.0  # the content, after the role chunk
