"""SSE first-token detection, usage sniffing, timing arithmetic and trace context."""

from __future__ import annotations

import random

from gateway.engine.sse import FirstTokenScanner, usage_of
from gateway.telemetry.timing import iso_utc, ms, round3, union_length
from gateway.telemetry.tracing import TraceContext, parse_traceparent

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


def test_role_chunk_is_not_a_usable_token_but_content_is():
    s = FirstTokenScanner()
    assert s.feed(ROLE) is False
    assert s.feed(TOKEN) is True


def test_event_split_across_chunks_is_found_once_complete():
    s = FirstTokenScanner()
    assert s.feed(TOKEN[:20]) is False
    assert s.feed(TOKEN[20:]) is True


def test_tool_calls_done_and_responses_deltas_are_usable():
    assert FirstTokenScanner().feed(b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n')
    assert FirstTokenScanner().feed(b"data: [DONE]\n\n")
    assert FirstTokenScanner().feed(
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n'
    )
    assert not FirstTokenScanner().feed(b'event: response.created\ndata: {"type":"response.created"}\n')
    assert FirstTokenScanner().feed(b'data: {"choices":[{"text":"x","index":0}]}\n')  # legacy completions


def test_events_not_shaped_like_a_chunk_are_relayed_as_tokens():
    # choices that are not a list of objects, a delta that is not one: the provider's business, never a crash
    for odd in (b"[1]", b"[null]", b'"abc"', b'{"0":{}}', b"true", b'[{"delta":"x"}]', b'[{"delta":[]}]'):
        s = FirstTokenScanner()
        assert s.feed(b'data: {"choices":' + odd + b"}\n\n"), odd
        assert s.token_seen and s.error is None
    assert not FirstTokenScanner().feed(b'data: {"choices":[{"delta":{"content":"","refusal":null}}]}\n\n')
    assert FirstTokenScanner().feed(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')


def test_usage_sniffing_without_a_full_parse():
    body = b'{"id":"x","usage":{"prompt_tokens": 12,"completion_tokens":7,"total_tokens":19}}'
    assert usage_of(body) == (12, 7)
    assert usage_of(b'{"usage":{"input_tokens":3,"output_tokens":4}}') == (3, 4)
    assert usage_of(b'{"choices":[]}') == (None, None)
    assert usage_of(b'{"usage":{"prompt_tokens": x}}') == (None, None)
    # names that merely end like ours do not count; details objects after the totals do not confuse it
    anthropic_like = b'{"usage":{"cache_creation_input_tokens":99,"input_tokens":5,"output_tokens":6}}'
    assert usage_of(anthropic_like) == (5, 6)
    detailed = (
        b'{"usage":{"prompt_tokens":9,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":1}}}'
    )
    assert usage_of(detailed) == (9, 2)
    assert usage_of(b'{"prompt_tokens":1,"usage":{"completion_tokens":3}}') == (None, 3)  # only after "usage"


def test_cheap_rounding_agrees_with_round_to_three_digits():
    rng = random.Random(7)
    values = [rng.uniform(0, 5) for _ in range(2000)] + [rng.uniform(0, 120_000) for _ in range(2000)]
    for x in values:
        if abs(x * 1000 % 1 - 0.5) > 1e-6:  # exact halves may go either way
            assert round3(x) == round(x, 3), x
    assert round3(0.0) == 0.0 and round3(1.23456) == 1.235
    assert ms(10.0, 10.0012344) == 1.234 and ms(None, 1.0) is None


def test_iso_utc_formats_milliseconds_and_follows_the_second():
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1733011200.5) == "2024-12-01T00:00:00.500Z"
    assert iso_utc(1733011200.0421) == "2024-12-01T00:00:00.042Z"  # the same second, from its cache
    assert iso_utc(1733011261.999) == "2024-12-01T00:01:01.999Z"
    assert iso_utc(1733011200.007) == "2024-12-01T00:00:00.007Z"  # back again: formatted anew


def test_union_length_merges_overlaps():
    assert union_length([]) == 0
    assert union_length([(0.0, 1.0)]) == 1.0
    assert union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert union_length([(1.0, 2.0), (0.0, 3.0)]) == 3.0


def test_trace_context_continues_client_trace_with_own_span():
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = TraceContext(tp, "vendor=1")
    assert ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ctx.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert ctx.span_id != "00f067aa0ba902b7" and ctx.tracestate == "vendor=1"


def test_invalid_traceparent_starts_a_new_trace():
    for bad in (
        None,
        "garbage",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ):
        assert parse_traceparent(bad) is None
        ctx = TraceContext(bad, "x=1")
        assert len(ctx.trace_id) == 32 and ctx.tracestate is None


def test_a_stream_without_a_usable_token_is_committed_after_a_bounded_prefix():
    from gateway.engine.sse import PRE_TOKEN_MAX

    s = FirstTokenScanner()
    keepalive = b": keep-alive\n\n" * 1000
    fed = 0
    while not s.feed(keepalive):
        fed += len(keepalive)
        assert fed <= PRE_TOKEN_MAX  # held no longer than this before the relay takes over
    assert fed + len(keepalive) > PRE_TOKEN_MAX
    line = FirstTokenScanner()  # one endless line without a newline, too
    assert not any(line.feed(b"x" * 4096) for _ in range(PRE_TOKEN_MAX // 4096))
    assert line.feed(b"x")
