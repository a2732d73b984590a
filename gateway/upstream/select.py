"""Which upstream client this process uses: ``LLMGW_UPSTREAM_CLIENT``, read once at start-up.

``h1`` (the default, ``h1.py``) is what the gateway ships with; ``httpx`` (``httpx_client.py``) stays
selectable as the well-kept library client it is measured against (docs/benchmarks.md, "Choosing the
upstream client"). Both implement ``base.UpstreamClient`` and are tested on the same contract.
"""

from __future__ import annotations

import functools
import os
from enum import StrEnum

from gateway.config import DeploymentConfig
from gateway.upstream.base import UpstreamClient
from gateway.upstream.h1 import H1UpstreamClient

CLIENT_ENV = "LLMGW_UPSTREAM_CLIENT"


class ClientKind(StrEnum):
    H1 = "h1"
    HTTPX = "httpx"


def parse_kind(value: str | None) -> ClientKind:
    if not value:
        return ClientKind.H1
    try:
        return ClientKind(value.strip().lower())
    except ValueError:
        names = ", ".join(k.value for k in ClientKind)
        raise ValueError(f"{CLIENT_ENV}={value!r}: unknown upstream client (one of {names})") from None


@functools.cache
def selected_kind() -> ClientKind:
    """The client kind for this process, read from the environment once."""
    return parse_kind(os.environ.get(CLIENT_ENV))


def make_client(dep: DeploymentConfig) -> UpstreamClient:
    """The upstream client for one deployment, of the kind ``LLMGW_UPSTREAM_CLIENT`` names."""
    return client_of_kind(selected_kind(), dep)


def client_of_kind(kind: ClientKind, dep: DeploymentConfig) -> UpstreamClient:
    if kind is ClientKind.H1:
        return H1UpstreamClient(dep)
    from gateway.upstream.httpx_client import HttpxUpstreamClient  # imported only when selected

    return HttpxUpstreamClient(dep)
