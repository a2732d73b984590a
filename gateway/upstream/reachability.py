"""Whether each deployment can be reached, kept current: a report, never a readiness gate.

Start-up checks and keep-warm pings say whether a deployment answers; one found unreachable is re-checked every few seconds until it answers, so a provider that was down when
the pod started is seen back as soon as it is (nothing is recorded once and kept forever).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from gateway.upstream.base import UpstreamClient
from gateway.upstream.prewarm import PrewarmResult, prewarm

log = logging.getLogger("llmgw.reachability")

RECHECK_S = 5.0  # how often an unreachable deployment is checked again


@dataclass(slots=True)
class Reachability:
    reachable: bool | None = None  # None: not checked yet
    detail: str = "not checked"
    checked_at: float = 0.0  # loop time of the last check
    avoid: bool = False  # routing should pass it by until a check finds it reachable (prewarm.PrewarmResult)


class ReachabilityBoard:
    """One entry per deployment; ``on_change(deployment, reachable)`` is called on every change and on
    every failed check (it feeds the metric and the retry budget)."""

    def __init__(self, deployments: Iterable[str], on_change: Callable[[str, bool], None]) -> None:
        self.entries = {d: Reachability() for d in deployments}
        self.on_change = on_change

    def record(self, deployment: str, ok: bool, detail: str, now: float, avoid: bool = False) -> None:
        e = self.entries.setdefault(deployment, Reachability())
        changed = e.reachable is not ok
        e.reachable, e.detail, e.checked_at, e.avoid = ok, detail, now, avoid and not ok
        if changed or not ok:  # a failed check is news every time (it renews "unreachable")
            self.on_change(deployment, ok)
        if changed:
            (log.info if ok else log.error)(
                "deployment %s is %s: %s", deployment, "reachable" if ok else "UNREACHABLE", detail
            )

    def record_check(self, r: PrewarmResult, now: float) -> None:
        if r.detail != "skipped":  # no start-up check configured: nothing learned
            self.record(r.deployment, r.ok, r.detail, now, r.avoid)

    def unreachable(self) -> list[str]:
        return [d for d, e in self.entries.items() if e.reachable is False]

    def view(self) -> dict[str, dict[str, object]]:
        return {d: {"reachable": e.reachable, "detail": e.detail} for d, e in self.entries.items()}

    async def recheck(
        self,
        clients: dict[str, UpstreamClient],
        interval_s: float = RECHECK_S,
        check: Callable[[UpstreamClient], Awaitable[PrewarmResult]] = prewarm,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Forever: check the unreachable deployments again every ``interval_s``."""
        loop = asyncio.get_running_loop()
        while True:
            await sleep(interval_s)
            down = [clients[d] for d in self.unreachable() if d in clients]
            if not down:
                continue
            for r in await asyncio.gather(*(check(c) for c in down)):
                self.record_check(r, loop.time())
