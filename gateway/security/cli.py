"""`llmgw keys`: hash | create | list | revoke. Keys are printed once, stored only as hashes."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.config import ConfigError, load_config
from gateway.security.keys import ApiKey, RedisKeyStore, hash_key, new_key


def add_key_commands(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="gateway API keys: hash | create | list | revoke")
    ks = k.add_subparsers(dest="keys_command", required=True)
    h = ks.add_parser("hash", help="print the hash of a key for auth.keys[].hash")
    h.add_argument("key")
    h.set_defaults(func=cmd_hash)
    for name, fn in (("create", cmd_create), ("list", cmd_list), ("revoke", cmd_revoke)):
        p = ks.add_parser(name)
        p.add_argument("--config", "-c", help="gateway config (for state.redis_* and key_prefix)")
        p.add_argument("--redis-url", help="overrides the config's state.redis_url")
        p.add_argument("--key-prefix", help="overrides the config's state.key_prefix")
        if name in ("create", "revoke"):
            p.add_argument("--id", required=True)
        if name == "create":
            p.add_argument("--models", default="*", help="comma-separated globs, e.g. 'chat-*,demo-embed'")
            p.add_argument("--rpm", type=int)
            p.add_argument("--tpm", type=int)
            p.add_argument("--max-concurrency", type=int)
            p.add_argument("--meta", action="append", default=[], help="KEY=VALUE, e.g. team=voice (repeatable)")
        p.set_defaults(func=fn)


def cmd_hash(args: argparse.Namespace) -> int:
    print(hash_key(args.key))
    return 0


def _store(args: argparse.Namespace) -> RedisKeyStore:
    from gateway.config import StateConfig
    from gateway.state.redis import RedisState, redis_target

    state = StateConfig(backend="redis")
    if args.config:
        try:
            state = load_config(args.config).state
        except ConfigError as exc:
            print(f"llmgw: invalid config {args.config}:\n{exc}", file=sys.stderr)
            raise SystemExit(2) from None
    # the config's redis_mode (sentinel, cluster) applies; --redis-url replaces its URL
    target = redis_target(state, url=args.redis_url, timeout_s=3.0)
    return RedisKeyStore(RedisState(target, args.key_prefix or state.key_prefix))


def _run(coro_fn, args: argparse.Namespace) -> int:  # noqa: ANN001
    store = _store(args)

    async def main() -> int:
        try:
            return await coro_fn(store, args)
        except ValueError as exc:
            print(f"llmgw: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            print(f"llmgw: Redis unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.backend.close()

    return asyncio.run(main())


def cmd_create(args: argparse.Namespace) -> int:
    async def go(store: RedisKeyStore, a: argparse.Namespace) -> int:
        meta = {}
        for item in a.meta:
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"--meta {item!r}: expected KEY=VALUE")
            meta[k] = v
        for name in ("rpm", "tpm", "max_concurrency"):
            v = getattr(a, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1")
        key = new_key()
        models = tuple(m.strip() for m in a.models.split(",") if m.strip()) or ("*",)
        await store.put(ApiKey(a.id, hash_key(key), models, a.rpm, a.tpm, a.max_concurrency, meta))
        print(f"created key {a.id!r} (models {','.join(models)}); it is shown only now:", file=sys.stderr)
        print(key)
        return 0

    return _run(go, args)


def cmd_list(args: argparse.Namespace) -> int:
    async def go(store: RedisKeyStore, a: argparse.Namespace) -> int:
        keys = await store.list()
        print(f"{'ID':<20} {'MODELS':<30} {'RPM':>7} {'TPM':>9} {'CONC':>5}  METADATA")
        for k in keys:
            print(f"{k.id:<20} {','.join(k.models):<30} {k.rpm or '-':>7} {k.tpm or '-':>9} "
                  f"{k.max_concurrency or '-':>5}  {k.metadata or ''}")
        return 0

    return _run(go, args)


def cmd_revoke(args: argparse.Namespace) -> int:
    async def go(store: RedisKeyStore, a: argparse.Namespace) -> int:
        if await store.revoke(a.id):
            print(f"revoked {a.id!r}")
            return 0
        print(f"llmgw: no key with id {a.id!r}", file=sys.stderr)
        return 1

    return _run(go, args)
