"""Affinity keys: every turn of a conversation shares one; another system prompt or conversation gets another."""

from __future__ import annotations

from gateway.policy.affinity import AffinityMode
from gateway.policy.affinity_key import PIECE_CHARS, affinity_key

SYSTEM = {"role": "system", "content": "You are a careful assistant for the billing team. " * 40}
PREFIX, KEY = AffinityMode.PREFIX, AffinityMode.KEY


def turns(system: dict, first: str, n: int) -> list[dict]:
    """The request bodies of a conversation's first n turns: each resends all before it and appends."""
    msgs = [system, {"role": "user", "content": first}]
    bodies = []
    for i in range(n):
        bodies.append({"model": "chat", "messages": list(msgs)})
        msgs += [
            {"role": "assistant", "content": f"answer {i}"},
            {"role": "user", "content": f"follow-up {i}"},
        ]
    return bodies


def test_every_turn_of_a_conversation_has_the_same_key():
    keys = {affinity_key(PREFIX, b, None) for b in turns(SYSTEM, "Why was I charged twice?", 6)}
    assert len(keys) == 1 and None not in keys


def test_a_different_system_prompt_gives_a_different_key():
    other = {"role": "system", "content": "You are a terse assistant for the legal team."}
    a = affinity_key(PREFIX, turns(SYSTEM, "hello", 1)[0], None)
    b = affinity_key(PREFIX, turns(other, "hello", 1)[0], None)
    assert a != b


def test_another_conversation_under_the_same_system_prompt_gets_its_own_key():
    a = affinity_key(PREFIX, turns(SYSTEM, "Why was I charged twice?", 1)[0], None)
    b = affinity_key(PREFIX, turns(SYSTEM, "How do I change my plan?", 1)[0], None)
    assert a != b


def test_a_system_prompt_differing_only_past_the_hashed_characters_still_differs_by_length():
    long_a = {"role": "system", "content": "x" * PIECE_CHARS + "a"}
    long_b = {"role": "system", "content": "x" * PIECE_CHARS + "bb"}
    assert affinity_key(PREFIX, turns(long_a, "q", 1)[0], None) != affinity_key(
        PREFIX, turns(long_b, "q", 1)[0], None
    )


def test_content_parts_count_like_strings_do():
    parts = {"role": "user", "content": [{"type": "text", "text": "look at this"}]}
    a = affinity_key(PREFIX, {"messages": [SYSTEM, parts]}, None)
    b = affinity_key(PREFIX, {"messages": [SYSTEM, parts, {"role": "assistant", "content": "ok"}]}, None)
    assert a == b is not None


def test_responses_api_input_and_instructions():
    first = {
        "model": "chat",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": "plan a trip"}],
    }
    later = {
        **first,
        "input": [
            *first["input"],
            {"role": "assistant", "content": "where?"},
            {"role": "user", "content": "Lisbon"},
        ],
    }
    assert affinity_key(PREFIX, first, None) == affinity_key(PREFIX, later, None) is not None
    assert affinity_key(PREFIX, {"input": "plan a trip"}, None) != affinity_key(
        PREFIX, {"input": "plan a walk"}, None
    )


def test_responses_api_chain_keys_on_its_instructions():
    """With previous_response_id, input is only the new turn: the turns share the instructions."""
    t2 = {"instructions": "Be brief.", "previous_response_id": "resp_1", "input": "and then?"}
    t3 = {"instructions": "Be brief.", "previous_response_id": "resp_2", "input": "why?"}
    assert affinity_key(PREFIX, t2, None) == affinity_key(PREFIX, t3, None) is not None


def test_legacy_prompt():
    assert affinity_key(PREFIX, {"prompt": "Once upon"}, None) == affinity_key(
        PREFIX, {"prompt": ["Once upon"]}, None
    )
    assert affinity_key(PREFIX, {"prompt": "Once upon"}, None) != affinity_key(
        PREFIX, {"prompt": "Twice"}, None
    )


def test_an_explicit_key_wins_and_key_mode_uses_nothing_else():
    body = turns(SYSTEM, "hello", 1)[0]
    assert affinity_key(KEY, body, None) is None  # key mode never reads content
    by_body = affinity_key(KEY, {**body, "prompt_cache_key": "user-42"}, None)
    by_header = affinity_key(KEY, body, "user-42")
    assert by_body == by_header is not None
    assert affinity_key(PREFIX, {**body, "prompt_cache_key": "user-42"}, None) == by_body
    assert affinity_key(KEY, {**body, "prompt_cache_key": ""}, None) is None


def test_nothing_to_key_on_is_unkeyed():
    assert affinity_key(PREFIX, {"model": "chat"}, None) is None
    assert affinity_key(PREFIX, {"messages": []}, None) is None
