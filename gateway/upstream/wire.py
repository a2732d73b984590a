"""What every upstream client shares: per-attempt connection facts, the static headers, the TLS context.

Connection set-up and reuse are observed per request, so the access log can say whether a request
paid for a cold connection (``upstream_connect_ms``) or waited for a pooled one (``pool_wait_ms``).
"""

from __future__ import annotations

import contextvars
import ssl
from urllib.parse import urlsplit

from gateway.config import DeploymentConfig
from gateway.telemetry.timing import round3

_JSON = "application/json"


class AttemptWire:
    """What the connection layer saw for one attempt (filled by the client while it sends)."""

    __slots__ = ("queued_at", "dequeued_at", "connect_start", "connect_end", "reused")

    def __init__(self) -> None:
        self.queued_at: float | None = None
        self.dequeued_at: float | None = None
        self.connect_start: float | None = None
        self.connect_end: float | None = None
        self.reused = False

    @property
    def connect_ms(self) -> float:
        if self.connect_start is None or self.connect_end is None:
            return 0.0
        return round3((self.connect_end - self.connect_start) * 1000.0)

    @property
    def pool_wait_ms(self) -> float:
        if self.queued_at is None or self.dequeued_at is None:
            return 0.0
        return round3((self.dequeued_at - self.queued_at) * 1000.0)


# The attempt whose request is being sent in this task, for a library client whose connection hooks
# cannot be handed the wire as an argument (h1 is handed it; httpx's network backend is not). Connection
# set-up runs inside the request's own task, so the hook finds the attempt's wire without plumbing.
CURRENT_WIRE: contextvars.ContextVar[AttemptWire | None] = contextvars.ContextVar("llmgw_wire", default=None)


def static_headers(dep: DeploymentConfig) -> dict[str, str]:
    """The headers every request to ``dep`` carries: content type, identity encoding, auth, configured."""
    headers: dict[str, str] = {"content-type": _JSON, "accept-encoding": "identity"}
    if dep.api_key and dep.auth_header == "authorization":
        headers["authorization"] = f"Bearer {dep.api_key}"
    elif dep.api_key and dep.auth_header == "api-key":
        headers["api-key"] = dep.api_key
    headers.update({k: str(v) for k, v in dep.headers.items()})  # str already (validated); typed so
    return headers


def tls_context(dep: DeploymentConfig) -> ssl.SSLContext | None:
    """Verification for an https:// deployment: the system CA store, plus ``ca_file`` when set."""
    if not dep.base_url.startswith("https://"):
        return None
    ctx = ssl.create_default_context()
    if dep.ca_file:
        ctx.load_verify_locations(cafile=dep.ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def endpoint_url(base_url: str, path: str) -> str:
    """``base_url`` with an API path appended before its query: ``https://h/openai/v1?api-version=x`` and
    ``/chat/completions`` give ``https://h/openai/v1/chat/completions?api-version=x`` (Azure's dated API
    versions are a query parameter of every call)."""
    head, sep, query = base_url.partition("?")
    return f"{head.rstrip('/')}{path}{sep}{query}"


def host_of(base_url: str) -> str:
    """``host[:port]`` of a base URL, as the access log names the upstream."""
    return urlsplit(base_url).netloc
