"""Typed gateway configuration: YAML in, validated models out.

Loading expands ``${VAR}`` / ``${VAR:-default}``, merges ``model_defaults`` into every model and
model-level ``timeouts``/``pool`` into every deployment, then validates. Any problem raises
``ConfigError`` whose message names the key path and the reason, e.g.
``models[0].deployments[1].base_url: not a URL``.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config_refs import reference_problems

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
RETRY_CONDITIONS = frozenset(
    {"connect-failure", "reset", "timeout", "5xx", "429", "408", "409", "500", "502", "503", "504"}
)
FALLBACK_CONDITIONS = frozenset({"5xx", "429", "timeout", "overload", "unhealthy"})


class ConfigError(Exception):
    """A config that cannot run; the message names the key and why."""


class _Strict(BaseModel):
    # no .inf or .nan anywhere: an infinite timeout or weight is a typo, and NaN compares false with everything
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false/yes/no are booleans, and pydantic's lax mode (kept: ${VAR}s expand to strings
        such as "8080") would read them as 1 and 0 where a number is wanted: `port: true` was port 1."""
        if isinstance(value, bool) and info.field_name in _numeric_fields(cls):
            raise ValueError(f"a number is wanted, not {str(value).lower()}")
        return value


@functools.cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of a config section that take a number and not a boolean."""
    names = set()
    for name, field in model.model_fields.items():
        kinds = set(typing.get_args(field.annotation)) or {field.annotation}
        if kinds & {int, float} and bool not in kinds:
            names.add(name)
    return frozenset(names)


# A DNS name as browsers send it in Host: ASCII labels of letters, digits, "-" and "_" (Compose service names).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    region: str | None = None
    workers: int = Field(1, ge=1, le=256)
    admin_port: int | None = Field(None, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_headers: int = Field(
        100, ge=8, le=10_000
    )  # header lines in a request head (Envoy's max_headers_count)
    max_json_depth: int = Field(64, ge=4, le=10_000)
    max_messages: int = Field(2048, ge=1)
    max_json_elements: int = Field(500_000, ge=1000)  # values in a request body (checked on its bytes)
    max_json_containers: int = Field(20_000, ge=16)  # arrays and objects in a request body
    request_headers_timeout_s: float = Field(10.0, gt=0)  # a request head must arrive within this
    request_timeout_s: float = Field(60.0, gt=0)  # a whole request (head and body) must arrive within this
    idle_timeout_s: float = Field(75.0, gt=0)  # a connection without a request in flight is closed after this
    send_timeout_s: float = Field(60.0, gt=0)  # a response the client stops reading is cut after this
    max_inflight: int = Field(0, ge=0)  # 0 = unlimited
    max_connections: int = Field(10_000, ge=0)  # open client connections per worker; 0 = unlimited
    drain_timeout_s: float = Field(30.0, ge=0)
    cors_origins: list[str] = []
    # Host names requests may be sent to besides IP addresses and localhost (DNS rebinding); "*": any
    allowed_hosts: list[str] = []

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, v: list[str]) -> list[str]:
        names = [h.lower().removesuffix(".") for h in v]
        for i, name in enumerate(names):
            if name != "*" and not (len(name) <= 253 and _HOST_NAME.fullmatch(name)):
                raise ValueError(
                    f"entry {i} ({v[i]!r}) is not a host name: give the name alone (gw.internal), without "
                    'scheme, port, path or wildcard, in ASCII (punycode); any port is allowed, "*" allows any host'
                )
        return names

    @model_validator(mode="after")
    def _ports(self) -> ServerConfig:
        if self.admin_port and self.admin_port == self.port:
            raise ValueError(
                f"server.admin_port: {self.admin_port} is server.port too; the admin listener needs a port "
                "of its own (or leave admin_port unset to serve /metrics and /readyz on the main port)"
            )
        return self


class StateConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "llmgw:"
    sync_interval_ms: float = Field(500.0, ge=50)
    key_ttl_s: float = Field(600.0, ge=10)
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    sentinels: list[str] = []  # "host:port" of each sentinel (redis_mode: sentinel)
    sentinel_master: str | None = None  # the master set name the sentinels monitor
    sentinel_password: str | None = None  # AUTH for the sentinels themselves, when they require one
    timeout_ms: float = Field(500.0, gt=0, le=60000)  # longest any request waits on Redis

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("not a redis:// URL")
        return v

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"entry {i} ({s!r}) is not host:port")
        return v

    def topology_error(self) -> str | None:
        """A combination of keys that cannot run, as "state.<key>: why" (None when it can)."""
        mode, url = self.redis_mode, urlsplit(self.redis_url)
        if mode != "standalone" and self.backend != "redis":
            return f"state.redis_mode: {mode} needs state.backend: redis"
        if mode == "sentinel":
            if not self.sentinels:
                return 'state.sentinels: redis_mode sentinel needs at least one sentinel "host:port"'
            if not self.sentinel_master:
                return (
                    "state.sentinel_master: redis_mode sentinel needs the master set name (Bitnami: mymaster)"
                )
        elif self.sentinels or self.sentinel_master or self.sentinel_password:
            key = (
                "sentinels"
                if self.sentinels
                else "sentinel_master"
                if self.sentinel_master
                else "sentinel_password"
            )
            return f"state.{key}: only used with state.redis_mode: sentinel (it is {mode})"
        if mode != "standalone" and url.scheme == "unix":
            return f"state.redis_url: redis_mode {mode} needs a redis:// or rediss:// URL, not a unix socket"
        if mode == "cluster" and url.path.strip("/") not in ("", "0"):
            return "state.redis_url: Redis Cluster has only database 0"
        return None


class AccessLogConfig(_Strict):
    path: str = "-"
    format: Literal["json", "text"] = "json"
    queue_size: int = Field(65536, ge=16)


class TracingConfig(_Strict):
    otlp_endpoint: str | None = None  # also enabled by OTEL_EXPORTER_OTLP_ENDPOINT
    service_name: str = "llm-gateway"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v and not _is_http_url(v):  # empty: off, as ${OTEL_COLLECTOR:-} gives when unset
            raise ValueError("not an OTLP/HTTP URL (expected http:// or https://host[:port])")
        return v


class ApiKeyConfig(_Strict):
    id: str

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return visible_id(v, "the access log's api_key_id, metrics and Redis keys")

    hash: str
    models: list[str] = ["*"]
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    metadata: dict[str, str] = {}

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", v):
            raise ValueError("must be the output of `llmgw keys hash KEY` (sha256:<64 hex>)")
        return v


class AuthConfig(_Strict):
    mode: Literal["none", "keys"] = "none"
    keys: list[ApiKeyConfig] = []
    redis_keys: bool = True  # also accept keys created with `llmgw keys create` (redis state backend)
    protect_metrics: bool = False  # the admin listener too: /metrics and /admin/* need a valid key there
    cache_ttl_s: float = Field(5.0, ge=0, le=300)  # how long a Redis key lookup is reused (revocation delay)

    @model_validator(mode="after")
    def _unique_ids(self) -> AuthConfig:
        ids = [k.id for k in self.keys]
        for i, key_id in enumerate(ids):
            if key_id in ids[:i]:
                raise ValueError(f"auth.keys[{i}].id: {key_id!r} is used twice (ids name metrics and limits)")
        return self


class TimeoutsConfig(_Strict):
    connect_ms: float = Field(2000.0, gt=0)
    ttft_ms: float = Field(30000.0, gt=0)
    per_try_ms: float = Field(120000.0, gt=0)
    idle_ms: float = Field(30000.0, gt=0)
    total_ms: float = Field(300000.0, gt=0)
    sdk_reply_margin_ms: float = Field(100.0, ge=0)


class RetryConfig(_Strict):
    max_retries: int = Field(10, ge=0, le=10)
    retry_on: list[str | int] = ["connect-failure", "reset", "502", "503", "504", "429", "timeout"]
    backoff_base_ms: float = Field(25.0, ge=0)
    backoff_max_ms: float = Field(250.0, ge=0)
    budget_percent: float = Field(20.0, ge=0, le=100)
    min_retry_concurrency: int = Field(3, ge=0)
    min_retries_per_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> RetryConfig:
        if self.backoff_base_ms > self.backoff_max_ms:
            raise ValueError("backoff_base_ms must not exceed backoff_max_ms")
        return self

    @field_validator("retry_on")
    @classmethod
    def _retry_on(cls, v: list[str | int]) -> list[str]:
        bad = [c for c in v if str(c) not in RETRY_CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition {bad[0]!r}; expected some of {sorted(RETRY_CONDITIONS)}")
        return [str(c) for c in v]


class HedgingConfig(_Strict):
    enabled: bool = False
    delay_ms: float | Literal["auto"] = "auto"
    quantile: float = Field(0.95, gt=0, lt=1)
    min_delay_ms: float = Field(50.0, ge=0)
    max_delay_ms: float = Field(2000.0, ge=0)
    max_hedges: int = Field(1, ge=1, le=3)
    budget_percent: float = Field(5.0, ge=0, le=100)

    @model_validator(mode="after")
    def _bounds(self) -> HedgingConfig:
        if self.delay_ms != "auto" and self.delay_ms < 0:
            raise ValueError("delay_ms must be a number of milliseconds >= 0, or auto")
        if self.min_delay_ms > self.max_delay_ms:
            raise ValueError("min_delay_ms must not exceed max_delay_ms")
        return self


class RoutingConfig(_Strict):
    strategy: Literal["latency", "weighted", "round-robin", "priority"] = "latency"
    locality: Literal["prefer", "strict", "off"] = "prefer"
    cross_region_penalty_ms: float = Field(50.0, ge=0)
    ewma_decay_s: float = Field(10.0, gt=0)
    # latency: a deployment left unpicked this long while others were picked gets one request (0 = never)
    probe_interval_s: float = Field(5.0, ge=0)
    affinity: Literal["off", "prefix", "key"] = "off"  # prefix-cache affinity (policy/affinity.py)
    affinity_epsilon: float = Field(0.25, ge=0)  # no deployment above ceil((1 + epsilon) x mean in-flight)
    affinity_slow_factor: float = Field(3.0, ge=0)  # home slower than this x the fastest: spill (0 = never)


class OutlierConfig(_Strict):
    consecutive_failures: int = Field(5, ge=1)
    base_ejection_s: float = Field(30.0, gt=0)
    max_ejection_s: float = Field(300.0, gt=0)
    max_ejection_percent: float = Field(50.0, ge=0, le=100)

    @model_validator(mode="after")
    def _bounds(self) -> OutlierConfig:
        if self.base_ejection_s > self.max_ejection_s:
            raise ValueError("base_ejection_s must not exceed max_ejection_s")
        return self


# What may go into an upstream request head as is (RFC 9110 5.1, 5.5): anything else could split it.
_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_VISIBLE_ID = re.compile(r"[\x21-\x7e]{1,128}")
_MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,254}[^\s\x00-\x1f\x7f])?")


def visible_id(v: str, names: str) -> str:
    """An id that goes into headers, metric labels and Redis keys as it is; ``names``: where it shows."""
    if not _VISIBLE_ID.fullmatch(v):
        raise ValueError(f"must be 1-128 visible ASCII characters, no spaces (it names {names})")
    return v


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class PoolConfig(_Strict):
    min_connections: int = Field(1, ge=0)
    max_connections: int = Field(256, ge=1)
    keepalive_expiry_s: float = Field(60.0, gt=0)
    keepwarm_interval_s: float = Field(30.0, ge=0)  # 0 = no keep-warm pings
    validate_on_start: bool = True

    @model_validator(mode="after")
    def _bounds(self) -> PoolConfig:
        if self.min_connections > self.max_connections:
            raise ValueError("min_connections must not exceed max_connections")
        return self


class ResponseLimitsConfig(_Strict):
    """What a provider's answer may cost the gateway before it is refused as malformed (502, flag UPE)."""

    max_head_bytes: int = Field(64 * 1024, ge=1024)  # status line and headers, 1xx heads included
    max_headers: int = Field(100, ge=8)  # header lines in one response head
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024
    )  # a non-stream body (streams are relayed, not held)


class WarmupConfig(_Strict):
    schemas: list[dict[str, Any] | str] = []
    timeout_ms: float = Field(60000.0, gt=0)
    required: bool = False
    concurrency: int = Field(4, ge=1)
    learn: bool = True  # record json_schema response formats seen in traffic and warm them everywhere
    learned_max: int = Field(200, ge=0)


class DegradeConfig(_Strict):
    when_remaining_ms_below: float | None = Field(None, gt=0)
    when_expected_ttft_exceeds_remaining: bool = False


class DeploymentConfig(_Strict):
    id: str
    base_url: str
    api_key: str | None = None
    auth_header: Literal["authorization", "api-key", "none"] = "authorization"
    headers: dict[str, str | int | float] = {}
    model: str | None = None  # upstream model name; defaults to the client-facing name
    region: str = "default"
    weight: float = Field(1.0, gt=0)
    priority: int = Field(0, ge=0)
    max_concurrency: int = Field(0, ge=0)  # 0 = unlimited
    ca_file: str | None = None  # PEM bundle trusted for this https:// upstream, besides the system store
    proxy: str | None = (
        None  # http://[user:pass@]host:port, or "direct"; unset: HTTPS_PROXY/HTTP_PROXY/NO_PROXY
    )
    timeouts: TimeoutsConfig = TimeoutsConfig()
    pool: PoolConfig = PoolConfig()
    response_limits: ResponseLimitsConfig = ResponseLimitsConfig()

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return visible_id(v, "the x-gateway-upstream response header, metrics and Redis keys")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not _is_http_url(v):
            raise ValueError("not a URL (expected http:// or https://)")
        parts = urlsplit(v)
        if parts.fragment:
            raise ValueError("a base_url has no #fragment")
        if parts.username or parts.password:  # it would show in logs, spans and admin views
            raise ValueError("credentials in the URL; put the key in api_key (or an authorization header)")
        head, sep, query = v.partition("?")
        return head.rstrip("/") + sep + query

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ssl.create_default_context().load_verify_locations(cafile=v)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA certificates from {v!r}: {exc}") from None
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str | int | float]) -> dict[str, str]:
        out = {k.lower(): str(val) for k, val in v.items()}
        for k, val in out.items():
            if not _HEADER_NAME.fullmatch(k):
                raise ValueError(f"{k!r} is not a valid HTTP header name")
            if _CTL.search(val):
                raise ValueError(f"the value of {k!r} holds a line break or control character")
            if not _latin1(val):
                raise ValueError(
                    f"the value of {k!r} holds characters an HTTP header cannot carry (only latin-1; "
                    "percent- or base64-encode it)"
                )
        return out

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is None or v == "direct":
            return v
        parts = urlsplit(v)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                'expected http://[user:password@]host:port of a forward proxy, or "direct" '
                "(a TLS connection to the proxy itself is not supported)"
            )
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("a proxy URL has no path or query")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and _CTL.search(v):
            raise ValueError("holds a line break or control character")
        if v is not None and not _latin1(v):
            raise ValueError("holds characters an HTTP header cannot carry (only latin-1)")
        return v


def _is_http_url(v: str) -> bool:
    """http(s)://host... with nothing that cannot go on a request line (whitespace, control characters)."""
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  # raises on a port that is not a number or out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not _URL_UNSAFE.search(v)


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


class ModelConfig(_Strict):
    name: str  # what clients send as "model"
    deployments: list[DeploymentConfig] = Field(min_length=1)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    retry: RetryConfig = RetryConfig()
    hedging: HedgingConfig = HedgingConfig()
    routing: RoutingConfig = RoutingConfig()
    outlier: OutlierConfig = OutlierConfig()
    pool: PoolConfig = PoolConfig()
    response_limits: ResponseLimitsConfig = ResponseLimitsConfig()
    warmup: WarmupConfig = WarmupConfig()
    fallbacks: list[str] = []
    fallback_on: list[str | int] = ["5xx", "429", "timeout", "overload", "unhealthy"]
    degrade: DegradeConfig = DegradeConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MODEL_NAME.fullmatch(v):
            raise ValueError("must be 1-256 characters, without control characters or spaces at either end")
        return v

    @field_validator("fallback_on")
    @classmethod
    def _fallback_on(cls, v: list[str | int]) -> list[str]:
        bad = [c for c in v if str(c) not in FALLBACK_CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition {bad[0]!r}; expected some of {sorted(FALLBACK_CONDITIONS)}")
        return [str(c) for c in v]


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    tracing: TracingConfig = TracingConfig()
    auth: AuthConfig = AuthConfig()
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        problems = reference_problems(
            [
                {
                    "name": m.name,
                    "fallbacks": m.fallbacks,
                    "deployments": [{"id": d.id} for d in m.deployments],
                }
                for m in self.models
            ]
        )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _state_topology(self) -> GatewayConfig:
        err = self.state.topology_error()
        if err:
            raise ValueError(err)
        return self

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


# ---------------------------------------------------------------- loading


def expand_env(
    value: Any, path: str = "", env: Mapping[str, str] | None = None, missing: dict[str, str] | None = None
) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string; an unset VAR without default is an error, or,
    given `missing`, recorded there (key path -> message) and replaced by "" so every problem is found."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in environ:
                return environ[var]
            if default is not None:
                return default
            message = f"{path or '<root>'}: environment variable {var} is not set (use ${{{var}:-default}})"
            if missing is None:
                raise ConfigError(message)
            missing[path or "<root>"] = message
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: expand_env(v, f"{path}.{k}" if path else str(k), environ, missing) for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", environ, missing) for i, v in enumerate(value)]
    return value


_INHERITED_MODEL_KEYS = (
    "timeouts",
    "retry",
    "hedging",
    "routing",
    "outlier",
    "pool",
    "warmup",
    "fallback_on",
    "degrade",
    "response_limits",
)
_INHERITED_DEPLOYMENT_KEYS = ("timeouts", "pool", "response_limits")


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def _apply_inheritance(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """model_defaults -> model -> deployment (timeouts and pool only). What is wrong with model_defaults
    itself goes to ``problems`` and is left out, so the rest of the file is still validated and every
    problem is reported at once."""
    raw = dict(raw)
    defaults = raw.pop("model_defaults", None) or {}
    if not isinstance(defaults, dict):
        problems.append("model_defaults: must be a mapping")
        defaults = {}
    for key in list(defaults):
        if key not in _INHERITED_MODEL_KEYS:
            problems.append(
                f"model_defaults.{key}: not a key models inherit (allowed: {', '.join(_INHERITED_MODEL_KEYS)})"
            )
        else:
            wrong = _default_problems(key, defaults[key])
            if wrong:  # said once, where it is written; the models do not inherit it
                problems += wrong
                defaults = {k: v for k, v in defaults.items() if k != key}
    models = raw.get("models")
    if not isinstance(models, list):
        return raw
    merged_models = []
    for m in models:
        if not isinstance(m, dict):
            merged_models.append(m)
            continue
        m = dict(m)
        for key in _INHERITED_MODEL_KEYS:
            if key in defaults:
                m[key] = _merge(defaults[key], m[key]) if key in m else defaults[key]
        deployments = m.get("deployments")
        if isinstance(deployments, list):
            m["deployments"] = [_inherit_deployment(d, m) if isinstance(d, dict) else d for d in deployments]
        merged_models.append(m)
    raw["models"] = merged_models
    return raw


def _default_problems(key: str, value: Any) -> list[str]:
    """What is wrong with ``model_defaults.<key>``, validated as a model's own ``key`` would be."""
    probe = {
        "name": "model_defaults",
        "deployments": [{"id": "probe", "base_url": "http://probe"}],
        key: value,
    }
    try:
        ModelConfig.model_validate(probe)
    except ValidationError as exc:
        return [
            f"model_defaults.{line}"
            for line in _format_validation_error(exc).splitlines()
            if line.startswith(key)
        ]
    return []


def _inherit_deployment(d: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for key in _INHERITED_DEPLOYMENT_KEYS:
        if key in model and isinstance(model[key], dict):
            d[key] = _merge(model[key], d[key]) if key in d else model[key]
    return d


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "union[")) and str(part) not in (
            "str",
            "int",
            "float",
            "bool",
            "dict",
            "list",
            "constrained-str",
        ):
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        loc = _format_loc(err["loc"])
        # model-level validators report their own path inside the message
        if loc == "<root>" and ": " in msg:
            lines.append(msg)
        else:
            lines.append(f"{loc}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def parse_config(raw: Any, env: dict[str, str] | None = None) -> GatewayConfig:
    if not isinstance(raw, dict):
        raise ConfigError("<root>: the config must be a YAML mapping")
    missing: dict[str, str] = {}
    expanded = expand_env(raw, env=env, missing=missing)
    problems = list(missing.values())  # every unset variable and every invalid key, reported at once
    merged = _apply_inheritance(expanded, problems)
    try:
        cfg = GatewayConfig.model_validate(merged)
    except ValidationError as exc:
        # a key whose variable is unset is reported once, as unset, not again as invalid
        problems += [
            line
            for line in _format_validation_error(exc).splitlines()
            if line.split(": ", 1)[0] not in missing
        ]
        # checks across sections run only once every field is valid: run them on the plain data too
        problems += reference_problems(merged.get("models")) + _state_problems(merged.get("state"))
    except ConfigError as exc:
        problems.append(str(exc))
    else:
        if not problems:
            return cfg
    raise ConfigError("\n".join(dict.fromkeys(problems)))


def _state_problems(state: Any) -> list[str]:
    """The state section's topology, when the section is valid on its own."""
    try:
        err = StateConfig.model_validate(state if state is not None else {}).topology_error()
    except ValidationError:
        return []  # reported with the rest
    return [err] if err else []


def load_config(path: str | Path, env: dict[str, str] | None = None) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        cfg = parse_config(raw, env=env)
    except ConfigError as exc:  # a schema file that cannot be read is one more problem of the same file
        problems = str(exc).splitlines() + _schema_file_problems(raw, p.parent)
        raise ConfigError("\n".join(dict.fromkeys(problems))) from None
    return _resolve_schema_files(cfg, p.parent)


def _schema_file_problems(raw: Any, base: Path) -> list[str]:
    """What is wrong with the warm-up schema files a config that failed validation names."""
    problems = []
    models = raw.get("models") if isinstance(raw, dict) else None
    for i, m in enumerate(models if isinstance(models, list) else ()):
        warmup = m.get("warmup") if isinstance(m, dict) else None
        schemas = warmup.get("schemas") if isinstance(warmup, dict) else None
        for j, s in enumerate(schemas if isinstance(schemas, list) else ()):
            if isinstance(s, str):
                problems += _read_schema(i, j, s, base)[1]
    return problems


def _read_schema(i: int, j: int, s: dict[str, Any] | str, base: Path) -> tuple[Any, list[str]]:
    """A warm-up schema (read from its file when given as a path), or the problem with it."""
    import orjson

    where = f"models[{i}].warmup.schemas[{j}]"
    if isinstance(s, str):
        fp = (base / s) if not Path(s).is_absolute() else Path(s)
        try:
            s = orjson.loads(fp.read_bytes())
        except OSError as exc:
            return None, [f"{where}: cannot read {s} ({exc.strerror})"]
        except orjson.JSONDecodeError as exc:
            return None, [f"{where}: {s} is not JSON ({exc})"]
    if not isinstance(s, dict) or not isinstance(s.get("schema"), dict) or not s.get("name"):
        return None, [
            f"{where}: expected {{name, strict, schema: {{...}}}} as in response_format.json_schema"
        ]
    return s, []


def _resolve_schema_files(cfg: GatewayConfig, base: Path) -> GatewayConfig:
    """Warm-up schemas given as file paths are read now, so a missing file fails at start-up."""
    models = []
    problems: list[str] = []
    for i, m in enumerate(cfg.models):
        schemas = []
        for j, given in enumerate(m.warmup.schemas):
            s, wrong = _read_schema(i, j, given, base)
            problems += wrong
            schemas.append(s)
        models.append(m.model_copy(update={"warmup": m.warmup.model_copy(update={"schemas": schemas})}))
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg.model_copy(update={"models": models})


# What /admin/config and check-config show as is. Allow-lists, not deny-lists: a header or query
# parameter named in a way nobody foresaw (x-upstream-credential, ?sig=) is hidden all the same.
_SHOWN_QUERY_PARAMS = frozenset(
    {"api-version", "db", "protocol", "timeout", "socket_timeout", "health_check_interval"}
)
REDACTED = "***"


def redact_url(url: str | None) -> str | None:
    """A URL without its secrets: userinfo replaced, every query value not on the allow-list replaced."""
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rpartition("@")[2]
    query = (
        "&".join(
            p
            if p.partition("=")[0].lower() in _SHOWN_QUERY_PARAMS or "=" not in p
            else p.partition("=")[0] + "=" + REDACTED
            for p in parts.query.split("&")
        )
        if parts.query
        else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(cfg: GatewayConfig) -> dict[str, Any]:
    """The config as a dict with every secret replaced, for check-config and /admin output: every header
    value, provider key, URL userinfo and query value not known to be harmless."""
    data = cfg.model_dump(mode="json")
    for m in data["models"]:
        for d in m["deployments"]:
            if d.get("api_key"):
                d["api_key"] = REDACTED
            d["headers"] = dict.fromkeys(d["headers"], REDACTED)
            d["base_url"] = redact_url(d["base_url"])
            d["proxy"] = redact_url(d.get("proxy"))
    for k in data["auth"]["keys"]:
        k["hash"] = k["hash"][:15] + "…"
    if data["state"].get("sentinel_password"):
        data["state"]["sentinel_password"] = REDACTED
    data["state"]["redis_url"] = redact_url(data["state"]["redis_url"])
    data["tracing"]["otlp_endpoint"] = redact_url(data["tracing"]["otlp_endpoint"])
    return data
