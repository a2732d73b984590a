"""Simulated providers in a background thread, for the gateway's embedded demo and for tests."""

from __future__ import annotations

import asyncio
import threading

from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SimThread:
    """Runs several SimServers in a daemon thread with its own event loop."""

    def __init__(
        self, specs: list[tuple[str, str, SimProfile]], host: str = "127.0.0.1", seed: int | None = None
    ) -> None:
        """``seed``: the servers' random draws (injected faults, latencies) repeat from run to run, server
        i seeded with ``seed + i``; None draws anew each run."""
        self.servers: dict[str, SimServer] = {
            name: SimServer(
                profile, name=name, region=region, host=host, seed=None if seed is None else seed + i
            )
            for i, (name, region, profile) in enumerate(specs)
        }
        if len(self.servers) != len(specs):
            raise ValueError("simulated provider names must be unique")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> dict[str, int]:
        """Start every server; returns name -> port once all are bound."""
        self._thread = threading.Thread(target=self._run, name="llmgw-sim", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return {name: s.port for name, s in self.servers.items()}

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                for server in self.servers.values():
                    loop.run_until_complete(server.start())
            except BaseException as exc:  # report a bind failure to start(), in the caller's thread
                self._error = exc
                loop.run_until_complete(self._stop_all())
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            loop.close()

    async def _stop_all(self) -> None:
        for server in self.servers.values():
            await server.stop()
