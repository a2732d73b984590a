"""The relay sends whole SSE events, however the provider's bytes were cut into reads (hypothesis).

A stream fragmented at arbitrary byte boundaries reaches the client unchanged, each write ending at an
event boundary; a stream broken at an arbitrary byte reaches it as every whole event before the break
and then one parseable error event, never a half event with the error glued on.
"""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_upstream import DONE, Playbook, Reply, play, sse

from gateway.engine.relay import split_at_event_end
from gateway.upstream.errors import UpstreamResetError

TIMEOUTS = {"ttft_ms": 5000, "per_try_ms": 60000, "idle_ms": 30000}
texts = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6)


def _fragments(data: bytes, cuts: list[int]) -> list[tuple[float, bytes]]:
    points = sorted({c % len(data) for c in cuts} - {0})
    edges = [0, *points, len(data)]
    return [(0.01, data[a:b]) for a, b in zip(edges, edges[1:], strict=False)]


def _relay(reply: Reply) -> tuple[list[bytes], dict]:
    async def scenario() -> tuple[list[bytes], dict]:
        pb = Playbook(
            [{"name": "m", "deployments": ["a"], "timeouts": TIMEOUTS, "retry": {"max_retries": 0}}],
            lambda req: reply,
        )
        call = pb.call("m", stream=True)
        rec = await pb.finish(call)
        return [m["body"] for m in call.down.messages if m["type"] == "http.response.body" and m["body"]], rec

    return play(scenario)


@settings(max_examples=60, deadline=None)
@given(texts, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_a_fragmented_stream_arrives_whole_and_unchanged(words: list[str], cuts: list[int]) -> None:
    data = b"".join(sse(w) for w in words) + DONE
    bodies, rec = _relay(Reply.stream(*_fragments(data, cuts)))
    assert b"".join(bodies) == data
    assert all(b.endswith(b"\n\n") for b in bodies)
    assert (rec["response_flags"], rec["bytes_sent"]) == ("-", len(data))


@settings(max_examples=60, deadline=None)
@given(texts, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), st.integers(min_value=1))
def test_a_stream_broken_anywhere_ends_with_whole_events_and_one_error_event(
    words: list[str], cuts: list[int], at: int
) -> None:
    data = b"".join(sse(w) for w in words)
    first = sse(words[0])
    broken = data[
        : len(first) + at % (len(data) - len(first) + 1)
    ]  # the first event whole: the stream committed
    reply = Reply.stream(*_fragments(broken, cuts), then_fail=UpstreamResetError("peer closed"))
    bodies, rec = _relay(reply)
    got = b"".join(bodies)
    whole, _ = split_at_event_end(broken)
    assert got.startswith(whole)
    events = [orjson.loads(e[len(b"data: ") :]) for e in got.split(b"\n\n") if e]  # every event parses
    assert events[-1]["error"]["code"] == "upstream_reset"
    assert len(events) == whole.count(b"\n\n") + 1
    assert (rec["response_flags"], rec["bytes_sent"]) == ("UC", len(got))


def test_split_at_event_end() -> None:
    assert split_at_event_end(b"data: 1\n\ndata: 2") == (b"data: 1\n\n", b"data: 2")
    assert split_at_event_end(b"data: 1\r\n\r\ndata: 2\r\n") == (b"data: 1\r\n\r\n", b"data: 2\r\n")
    assert split_at_event_end(b"data: 1\n\n") == (b"data: 1\n\n", b"")
    assert split_at_event_end(b"data: 1\n") == (b"", b"data: 1\n")
