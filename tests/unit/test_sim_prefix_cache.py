"""The simulator's prompt-prefix cache: later turns hit the earlier turns' blocks, an LRU bounded in tokens."""

from __future__ import annotations

from gateway.sim.prefix_cache import BLOCK_TOKENS, PrefixCache, prompt_text

SYSTEM = {"role": "system", "content": "You answer questions about invoices. " * 100}  # ~900 tokens


def chat(*msgs: dict) -> bytes:
    return prompt_text({"model": "m", "messages": [SYSTEM, *msgs]})


def test_a_later_turn_finds_the_earlier_turn_cached():
    cache = PrefixCache()
    t1 = chat({"role": "user", "content": "why?"})
    t2 = chat(
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because"},
        {"role": "user", "content": "and then?"},
    )
    assert cache.lookup_and_fill(t1, 100_000) == 0  # cold
    hit = cache.lookup_and_fill(t2, 100_000)
    assert len(t1) // 4 - BLOCK_TOKENS <= hit <= len(t1) // 4  # all of turn 1 but its last partial block
    assert (
        cache.lookup_and_fill(t2, 100_000) == (len(t2) // 64) * BLOCK_TOKENS
    )  # the same prompt again: all of it


def test_a_different_system_prompt_shares_nothing():
    cache = PrefixCache()
    cache.lookup_and_fill(chat({"role": "user", "content": "hi"}), 100_000)
    other = prompt_text(
        {"messages": [{"role": "system", "content": "Legal. " * 300}, {"role": "user", "content": "hi"}]}
    )
    assert cache.lookup_and_fill(other, 100_000) == 0


def test_the_same_system_prompt_is_shared_between_conversations():
    cache = PrefixCache()
    cache.lookup_and_fill(chat({"role": "user", "content": "question one"}), 100_000)
    hit = cache.lookup_and_fill(chat({"role": "user", "content": "question two"}), 100_000)
    assert hit >= len(prompt_text({"messages": [SYSTEM]})) // 4 - BLOCK_TOKENS


def test_least_recently_used_prefixes_are_evicted_at_capacity():
    cache = PrefixCache()
    a = prompt_text({"prompt": "a" * 4000})  # 1,000 tokens each
    b = prompt_text({"prompt": "b" * 4000})
    cache.lookup_and_fill(a, 1_500)
    cache.lookup_and_fill(b, 1_500)  # a's oldest blocks make room
    assert len(cache) * BLOCK_TOKENS <= 1_500
    assert cache.lookup_and_fill(b, 1_500) > 0
    assert cache.lookup_and_fill(a, 1_500) == 0  # a's first block is gone, so none of it is a usable prefix


def test_no_capacity_caches_nothing():
    cache = PrefixCache()
    text = chat({"role": "user", "content": "x"})
    cache.lookup_and_fill(text, 0)
    assert cache.lookup_and_fill(text, 0) == 0 and len(cache) == 0


def test_responses_and_legacy_prompts_have_text():
    assert prompt_text({"instructions": "Be brief.", "input": "hello"}) == b"Be brief.hello"
    assert prompt_text({"prompt": ["Once upon"]}) == b"Once upon"


def test_every_sim_flag_says_what_it_does():
    """`llmgw sim --help` (README: every command has --help): a knob without an entry in the CLI's help table
    was described by its own name (`--prefix-cache-tokens`: "prefix_cache_tokens")."""
    import argparse
    from dataclasses import fields

    from gateway.sim.cli import add_arguments
    from gateway.sim.profile import SimProfile

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest.removeprefix("knob_"): a.help or "" for a in parser._actions}
    for f in fields(SimProfile):
        assert not helps[f.name].startswith(f"{f.name} (default"), f"--{f.name.replace('_', '-')}: no help"
