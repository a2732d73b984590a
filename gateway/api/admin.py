"""The admin listener: `/metrics`, `/healthz`, `/readyz` and `/admin/*` on `server.admin_port`.

Started from the app's lifespan next to the main server, so operators can keep probes and scrapes
on a port that is never exposed to API clients. It is a second uvicorn server on our own socket:
no lifespan of its own and no signal handlers (the main server owns those), and SO_REUSEPORT so
every worker of a multi-worker gateway can listen on the same admin port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from gateway.api.types import ASGIApp

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("llmgw")


class AdminServer:
    def __init__(self, app: ASGIApp, host: str, port: int, drain_timeout_s: float = 2.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._tick: asyncio.Task | None = None

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(
                f"server.admin_port: cannot listen on {self.host}:{self.port} ({exc.strerror})"
            ) from None
        return sock

    async def start(self, _lifecycle: object = None) -> None:
        import uvicorn

        cfg = uvicorn.Config(
            self.app,
            interface="asgi3",
            lifespan="off",
            http="httptools",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=self.drain_timeout_s,  # type: ignore[arg-type]  # a float: uvicorn waits with asyncio
        )
        cfg.load()
        self._sock = self._bind()
        server = uvicorn.Server(cfg)
        server.lifespan = cfg.lifespan_class(cfg)
        await server.startup(sockets=[self._sock])
        self._server = server
        # main_loop only refreshes the Date header and watches should_exit; it costs one wake-up per 100 ms.
        self._tick = asyncio.get_running_loop().create_task(server.main_loop())
        log.info(
            "admin endpoints on http://%s:%d (/metrics, /healthz, /readyz, /admin/*)",
            self.host,
            self._sock.getsockname()[1],
        )

    async def stop(self, _lifecycle: object = None) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._tick is not None:
            await self._tick
        await self._server.shutdown(sockets=[self._sock] if self._sock is not None else None)
        self._server = None
