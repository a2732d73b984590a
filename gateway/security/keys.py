"""Gateway API keys: stored only as hashes, compared in constant time, from config or Redis.

Keys are random 256-bit secrets, so a fast SHA-256 is the right hash (there is nothing to brute
force); the hash is what the config and Redis hold, never the key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

KEY_PREFIX = "sk-gw-"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    hash: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "hash": self.hash,
                "models": list(self.models),
                "rpm": self.rpm,
                "tpm": self.tpm,
                "max_concurrency": self.max_concurrency,
                "metadata": self.metadata,
                "created": int(time.time()),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> ApiKey:
        d: dict[str, Any] = orjson.loads(raw)
        return cls(
            d["id"],
            d["hash"],
            tuple(d.get("models") or ["*"]),
            d.get("rpm"),
            d.get("tpm"),
            d.get("max_concurrency"),
            d.get("metadata") or {},
        )


def bearer_token(headers: dict[str, str]) -> str | None:
    auth = (headers.get("authorization") or "").strip()
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get("api-key")  # Azure-style clients
    return key.strip() if key else None


def other_scheme(headers: dict[str, str]) -> str | None:
    """The scheme of an ``Authorization`` credential the gateway does not read (``Basic``), at most 40
    characters (it goes into an error message); None without one, or for a Bearer credential."""
    given = (headers.get("authorization") or "").split()
    return given[0][:40] if given and given[0].lower() != "bearer" else None


def conflicting_keys(headers: dict[str, str]) -> bool:
    """``api-key`` carries a key and ``Authorization`` anything but that same key as a Bearer token: another
    key (a proxy in front may have checked the other one), or a credential of another scheme (``Basic``).
    No SDK sends the latter beside ``api-key`` (OpenAI's send ``Authorization: Bearer``, Azure's ``api-key``):
    it is a front proxy's login passed on, or a caller's key in a form the gateway does not read. Serving
    on ``api-key`` would ignore a credential someone meant, and a 401 "missing key" would hide that a key
    was there, so it is refused as two keys are, the answer saying which header to drop."""
    auth, key = (headers.get("authorization") or "").strip(), (headers.get("api-key") or "").strip()
    if not auth or not key:
        return False
    return bearer_token(headers) != key  # Authorization's (it is given): None when not a Bearer key


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class RedisKeyStore:
    """Keys created with `llmgw keys create`: one JSON value per hash, plus an id index for list/revoke."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _k(self, h: str) -> str:
        return f"{self.backend.prefix}apikey:{h}"

    @property
    def _index(self) -> str:
        return f"{self.backend.prefix}apikeys"

    async def get(self, h: str) -> ApiKey | None:
        raw = await self.backend.get(self._k(h))
        return ApiKey.from_json(raw) if raw else None

    async def put(self, key: ApiKey) -> None:
        existing = await self.backend.hgetall(self._index)
        if key.id in existing:
            raise ValueError(f"a key with id {key.id!r} exists; revoke it first")
        await self.backend.set(self._k(key.hash), key.to_json(), 10 * 365 * 86400.0)
        await self.backend.hset(self._index, {key.id: key.hash.encode()}, None)

    async def list(self) -> list[ApiKey]:
        out = []
        for _id, h in (await self.backend.hgetall(self._index)).items():
            k = await self.get(h.decode() if isinstance(h, bytes) else h)
            if k is not None:
                out.append(k)
        return sorted(out, key=lambda k: k.id)

    async def revoke(self, key_id: str) -> bool:
        idx = await self.backend.hgetall(self._index)
        h = idx.get(key_id)
        if h is None:
            return False
        h = h.decode() if isinstance(h, bytes) else h
        await self.backend.delete(self._k(h))  # a delete, which a full Redis (noeviction) still takes
        await self.backend.hdel(self._index, key_id)
        return True
