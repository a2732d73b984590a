"""Generated SSE response streams cut at random byte boundaries: relaying and sniffing do not depend on the cuts.

Each stream is fed the way the engine feeds it: the attempt reads chunks into the first-token scanner
until it fires, the relay sends what the attempt read and then every further chunk, and usage is
sniffed from the relayed chunks. Whatever the cuts, the relayed bytes are the stream's bytes, the
first usable token is seen in the chunk that completes its line, and usage is the stream's usage.
"""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.engine.sse import FirstTokenScanner, UsageTail, usage_of

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def chunk_event(
    delta: dict | None = None, choices: bool = True, usage: dict | None = None, finish: str | None = None
) -> dict:
    ev: dict = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m"}
    ev["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    ev["usage"] = usage  # OpenAI sends "usage": null in every chunk when include_usage is on
    return ev


# (event bytes, whether it is a usable first token)
role = st.just((orjson.dumps(chunk_event({"role": "assistant", "content": ""})), False))
keepalive = st.just((b"", False))  # a comment line, not a data line
empty_choices = st.just((orjson.dumps(chunk_event(choices=False)), False))
content = TEXT.filter(bool).map(lambda t: (orjson.dumps(chunk_event({"content": t})), True))
tool = TEXT.map(
    lambda t: (orjson.dumps(chunk_event({"tool_calls": [{"index": 0, "function": {"arguments": t}}]})), True)
)
finish = st.just((orjson.dumps(chunk_event(finish="stop")), True))
tokens = st.integers(0, 10**7)
usage = st.tuples(tokens, tokens).map(
    lambda pc: (
        orjson.dumps(
            chunk_event(
                choices=False,
                usage={
                    "prompt_tokens": pc[0],
                    "completion_tokens": pc[1],
                    "total_tokens": pc[0] + pc[1],
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            )
        ),
        False,
    )
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int | None, tuple[int | None, int | None]]:
    """An SSE stream; the offset just past the line of its first usable event; its usage."""
    events = draw(
        st.lists(st.one_of(role, keepalive, empty_choices, content, tool, finish, usage), max_size=12)
    )
    if draw(st.booleans()):
        events.append((b"[DONE]", True))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    out = b""
    first_end: int | None = None
    for data, usable in events:
        line = b": keep-alive" if not data else b"data: " + data
        out += line + newline
        if usable and first_end is None:
            first_end = len(out) - len(newline) + 1  # a CR ends the line already (the SSE spec): CRLF's too
        out += newline
    return out, first_end, usage_of(out)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def relay(chunks: list[bytes]) -> tuple[bytes, int | None, tuple[int | None, int | None]]:
    """What the engine sends for these upstream chunks, where the scanner fired (bytes read), and usage."""
    scanner = FirstTokenScanner()
    read: list[bytes] = []
    fired_at = None
    rest = iter(chunks)
    for chunk in rest:  # the attempt, before commit
        read.append(chunk)
        if scanner.feed(chunk):
            fired_at = sum(map(len, read))
            break
    sent = [b"".join(read)]
    tail = UsageTail()
    tail.feed(sent[0])
    for chunk in rest:  # the relay, after commit
        tail.feed(chunk)
        sent.append(chunk)
    return b"".join(sent), fired_at, tail.usage()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.lists(st.integers(0, 10**6), max_size=40))
def test_relay_first_token_and_usage_do_not_depend_on_where_the_stream_is_cut(
    stream: tuple[bytes, int | None, tuple[int | None, int | None]], points: list[int]
) -> None:
    data, first_end, expected_usage = stream
    chunks = cut(data, points)
    sent, fired_at, got_usage = relay(chunks)
    assert sent == data
    if first_end is None:
        assert fired_at is None
    else:  # fired in the chunk that completed the first usable line, not before, not later
        assert fired_at is not None and fired_at >= first_end
        assert fired_at - len(next(c for c in reversed(_prefix(chunks, fired_at)))) < first_end
    assert got_usage == expected_usage


@settings(max_examples=200, deadline=None)
@given(st.tuples(tokens, tokens), st.lists(st.integers(1, 7), min_size=1, max_size=400))
def test_usage_cut_into_pieces_smaller_than_its_key_is_still_read(
    pc: tuple[int, int], sizes: list[int]
) -> None:
    body = b'data: {"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\n' % pc
    chunks, at = [], 0
    for n in sizes * (len(body) // len(sizes) + 1):
        if at >= len(body):
            break
        chunks.append(body[at : at + n])
        at += n
    tail = UsageTail()
    for c in chunks:
        tail.feed(c)
    assert tail.usage() == pc


def _prefix(chunks: list[bytes], size: int) -> list[bytes]:
    out, total = [], 0
    for c in chunks:
        if total >= size:
            break
        out.append(c)
        total += len(c)
    return out
