"""Whether a response handed to the server whole left the gateway: the one decision success and error
answers share (engine/relay.py ``wait_delivery``)."""

from __future__ import annotations

import asyncio

from gateway.engine.relay import wait_delivery


class Connection:
    """A ``Downstream``: its state, and what its wait answers once asked."""

    def __init__(self, blocked: float = 0.0, cut: bool = False, answer: bool = True) -> None:
        self.send_blocked_t = blocked
        self.cut = cut
        self.answer = answer
        self.waits = 0

    async def delivered(self) -> bool:
        self.waits += 1
        return self.answer


def _delivered(ds: Connection | None) -> bool:
    return asyncio.run(wait_delivery(ds))


def test_an_answer_the_kernel_took_whole_left_without_a_wait():
    ds = Connection()
    assert _delivered(ds) is True and ds.waits == 0
    assert _delivered(None) is True  # another server: nothing tells


def test_an_answer_that_waits_in_the_gateway_is_waited_for_and_the_connection_tells():
    assert _delivered(Connection(blocked=1.0, answer=True)) is True  # it left
    ds = Connection(blocked=1.0, answer=False)
    assert _delivered(ds) is False and ds.waits == 1  # cut first


def test_an_answer_sent_after_the_connection_was_cut_never_left():
    """The cut clears the pause (its bytes are gone): an answer whose send waited it out and was dropped is
    not taken for one the kernel took."""
    ds = Connection(cut=True, answer=False)
    assert _delivered(ds) is False and ds.waits == 1
