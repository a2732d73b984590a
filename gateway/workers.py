"""Several uvicorn workers under one supervisor that also keeps the pod's metrics and exit code honest.

uvicorn's supervisor restarts a dead worker and stops when one fails to start, but it exits 0 either
way and knows nothing of metrics. This one removes a dead worker's live-gauge files at once (its
in-flight requests and connections no longer exist) and exits non-zero when a worker could not start.
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess


class Supervisor(Multiprocess):
    def __init__(self, config: Config, sockets: list[Any], metrics_dir: str | None) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.startup_failed = False

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        super().keep_subprocess_alive()
        for p in before:
            if p.exitcode is None:  # still running
                continue
            if p.exitcode == STARTUP_FAILURE:
                self.startup_failed = True
            if self.metrics_dir and p.pid is not None:
                from prometheus_client.multiprocess import mark_process_dead

                mark_process_dead(p.pid, self.metrics_dir)


def listening_socket(config: Config) -> socket.socket:
    """The public socket, bound and listening before the app starts (as uvicorn's supervisor binds it for
    workers): a connection made while start-up runs waits in the backlog instead of being refused, which
    matters once readiness is probed on the admin port, ready before uvicorn would bind the public one."""
    sock: socket.socket = config.bind_socket()  # exits 1 itself when the port is taken
    sock.listen(config.backlog)
    return sock


def run_workers(config: Config, metrics_dir: str | None) -> int:
    """Serve with ``config.workers`` processes; the exit code says whether they started."""
    sock = listening_socket(config)
    sup = Supervisor(config, [sock], metrics_dir)
    try:
        sup.run()
    finally:
        sock.close()
    return STARTUP_FAILURE if sup.startup_failed else 0
