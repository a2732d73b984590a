"""Schema warm-up: no user pays for a cold grammar compile.

Providers compile a strict ``json_schema`` response format on first use (seconds, up to a minute).
Before a gateway takes traffic it sends each configured or learned schema to each deployment of the
model as a minimal structured-output request (one output token). Schemas seen in traffic are
learned (the schema only, never the messages), kept bounded and expiring in the state backend, and
warmed on the model's other deployments in the background, so no region or new pod serves cold.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from gateway.config import redact_url
from gateway.upstream.base import UpstreamClient
from gateway.upstream.errors import UpstreamConnectError, UpstreamError

log = logging.getLogger("llmgw.warmup")


@dataclass(frozen=True, slots=True)
class WarmupResult:
    model: str
    deployment: str
    schema: str
    ok: bool
    ms: float
    detail: str


def schema_fingerprint(json_schema: dict[str, Any]) -> str:
    """Stable id of a schema (key order does not matter): what the provider's grammar cache keys on."""
    return hashlib.sha256(orjson.dumps(json_schema.get("schema"), option=orjson.OPT_SORT_KEYS)).hexdigest()[
        :32
    ]


def warmup_body(upstream_model: str, json_schema: dict[str, Any]) -> bytes:
    js = dict(json_schema)
    js["strict"] = True
    return orjson.dumps(
        {
            "model": upstream_model,
            "messages": [{"role": "user", "content": "warm-up"}],
            "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": js},
        }
    )


async def warm_one(
    client: UpstreamClient, model: str, upstream_model: str, json_schema: dict[str, Any], timeout_s: float
) -> WarmupResult:
    """One schema on one deployment. Connection failures are retried (tenacity); HTTP answers are final."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    name = str(json_schema.get("name", "?"))
    body = warmup_body(upstream_model, json_schema)
    headers = dict(client.static_headers)
    headers["x-request-id"] = f"warmup-{schema_fingerprint(json_schema)[:12]}"

    def failed(detail: str) -> WarmupResult:
        return WarmupResult(model, client.deployment.id, name, False, (loop.time() - t0) * 1000, detail)

    try:
        async with asyncio.timeout(timeout_s):
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                reraise=True,
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                retry=retry_if_exception_type((UpstreamError, ConnectionError)),
            ):
                with attempt:
                    status, text = await _post(client, body, headers)
    except TimeoutError:
        return failed(f"timed out after {timeout_s * 1000:.0f} ms")
    except (UpstreamConnectError, ConnectionRefusedError) as exc:
        return failed(connect_failure(exc, client.deployment.base_url))
    except (UpstreamError, OSError) as exc:
        return failed(f"{type(exc).__name__}: {exc}"[:200])
    ms = (loop.time() - t0) * 1000
    if status == 200:
        return WarmupResult(model, client.deployment.id, name, True, ms, "ok")
    return WarmupResult(model, client.deployment.id, name, False, ms, f"HTTP {status}: {text[:200]}")


def connect_failure(exc: BaseException, base_url: str) -> str:
    """A connect error said with the deployment's own URL and the OS's reason (not asyncio's address text)."""
    os_error = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    code = getattr(os_error, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(os_error) or type(exc).__name__
    return f"cannot connect to {redact_url(base_url)}: {reason}"[:200]  # a query may hold a key


async def _post(client: UpstreamClient, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    from gateway.upstream.wire import AttemptWire

    resp = await client.post("/chat/completions", body, headers, AttemptWire())
    try:
        data = await resp.read()
    finally:
        resp.release()
    return resp.status, data.decode("utf-8", "replace")


async def warm_all(
    jobs: list[tuple[UpstreamClient, str, str, dict[str, Any]]], *, timeout_s: float, concurrency: int
) -> list[WarmupResult]:
    """Run (client, model, upstream_model, schema) jobs concurrently within ``concurrency``."""
    sem = asyncio.Semaphore(concurrency)

    async def run(job: tuple[UpstreamClient, str, str, dict[str, Any]]) -> WarmupResult:
        async with sem:
            return await warm_one(job[0], job[1], job[2], job[3], timeout_s)

    return list(await asyncio.gather(*(run(j) for j in jobs)))


class SchemaLearner:
    """Remembers json_schema response formats seen in traffic; shares them; warms them elsewhere."""

    def __init__(self, backend: Any, ttl_s: float, max_per_model: int) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self.max_per_model = max_per_model
        self.known: dict[str, set[str]] = {}  # model -> fingerprints seen or warmed by this process
        self._tasks: set[asyncio.Task] = set()

    def key(self, model: str) -> str:
        return f"{self.backend.prefix}schemas:{model}"

    def seen(self, model: str, fingerprint: str) -> bool:
        return fingerprint in self.known.get(model, ())

    def mark(self, model: str, fingerprint: str) -> None:
        self.known.setdefault(model, set()).add(fingerprint)

    async def load(self, model: str) -> list[dict[str, Any]]:
        raw = await self.backend.hgetall(self.key(model))
        out = []
        for fp, value in raw.items():
            try:
                out.append(orjson.loads(value))
                self.mark(model, fp)
            except orjson.JSONDecodeError:
                continue
        return out

    def observe(self, model: str, json_schema: dict[str, Any], warm: Any) -> None:
        """Called from the request path for structured-output requests: cheap unless the schema is new."""
        fp = schema_fingerprint(json_schema)
        if self.seen(model, fp):
            return
        if len(self.known.get(model, ())) >= self.max_per_model:
            return
        self.mark(model, fp)
        t = asyncio.get_running_loop().create_task(self._learn(model, fp, json_schema, warm))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _learn(self, model: str, fp: str, json_schema: dict[str, Any], warm: Any) -> None:
        try:
            await self.backend.hset(self.key(model), {fp: orjson.dumps(json_schema)}, self.ttl_s)
        except Exception as exc:
            log.warning("could not record learned schema for %s: %s", model, exc)
        try:
            await warm(model, json_schema)
        except Exception as exc:
            log.warning("background warm-up of a learned schema for %s failed: %s", model, exc)
