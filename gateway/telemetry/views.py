"""What telemetry reads of a finished request and its attempts: Protocols, so telemetry depends on no
engine type (the layers point down: engine -> telemetry) and the engine's objects satisfy them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from gateway.telemetry.tracing import TraceContext


class UpstreamHostView(Protocol):
    @property
    def host(self) -> str: ...


class DeploymentView(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def region(self) -> str: ...

    @property
    def upstream_model(self) -> str: ...

    @property
    def client(self) -> UpstreamHostView: ...


class ResponseHeadView(Protocol):
    @property
    def status(self) -> int: ...


class AttemptView(Protocol):
    """One upstream try, as an attempt span shows it."""

    @property
    def kind(self) -> Enum: ...  # the role: primary, retry, hedge

    @property
    def index(self) -> int: ...

    @property
    def ok(self) -> bool: ...

    @property
    def state(self) -> Enum: ...

    @property
    def dep(self) -> DeploymentView: ...

    @property
    def status(self) -> int | None: ...

    @property
    def resp(self) -> ResponseHeadView | None: ...

    @property
    def failure(self) -> Enum | None: ...

    @property
    def error_detail(self) -> str: ...

    @property
    def t_start(self) -> float: ...

    @property
    def t_end(self) -> float | None: ...


class ExchangeView(Protocol):
    """One client request, as the server span and the attempt spans show it."""

    @property
    def trace(self) -> TraceContext: ...

    @property
    def model_name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def upstream_path(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    @property
    def headers(self) -> dict[str, str]: ...

    @property
    def request_id(self) -> str: ...

    @property
    def t_received(self) -> float: ...

    @property
    def wall_start(self) -> float: ...

    @property
    def attempts(self) -> Sequence[AttemptView]: ...
