"""A simulated OpenAI-compatible provider: realistic latency, faults on demand, and counters of what it saw.

`SimProfile` (profile.py) is the knob set; `SimServer` (server.py) serves one provider on a port;
`SimThread` (runner.py) runs several in a background thread; cli.py is `llmgw sim` / `python -m gateway.sim`.
"""

from __future__ import annotations

from typing import Any

from gateway.sim.profile import SimProfile

__all__ = ["SimProfile", "SimServer", "SimThread"]


def __getattr__(name: str) -> Any:
    # Lazy: `llmgw` builds its parser from gateway.sim.cli and should not pay for the server's imports.
    if name == "SimServer":
        from gateway.sim.server import SimServer

        return SimServer
    if name == "SimThread":
        from gateway.sim.runner import SimThread

        return SimThread
    raise AttributeError(name)
