"""`llmgw keys`: hash | create | list | revoke. Keys are printed once, stored only as hashes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from gateway.config import ConfigError, GatewayConfig, load_config, visible_id
from gateway.security.keys import ApiKey, RedisKeyStore, hash_key, new_key

_HELP = {
    "create": (
        "create a key in the state backend (Redis) and print it once",
        "Create an API key, store its hash in the config's Redis state backend and print the key once. "
        "The gateway accepts it at once (auth.mode: keys, auth.redis_keys: true).",
    ),
    "list": (
        "list the keys in the state backend (Redis)",
        "List the keys stored in the config's Redis state backend "
        "(ids, models, limits, metadata; never the keys themselves).",
    ),
    "revoke": (
        "revoke a key in the state backend (Redis)",
        "Revoke a key by id; gateways stop accepting it within auth.cache_ttl_s.",
    ),
}


def add_key_commands(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "keys",
        help="gateway API keys: hash | create | list | revoke",
        description="Gateway API keys. `hash` makes a hash for auth.keys in the config; create, list "
        "and revoke manage keys in the Redis state backend, shared by every gateway.",
    )
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    h = ks.add_parser(
        "hash",
        help="print the hash of a key for auth.keys[].hash",
        description="Print the hash of KEY, to list it in the config under auth.keys[].hash.",
    )
    h.add_argument("key", help="the key (e.g. sk-gw-...)")
    h.set_defaults(func=cmd_hash)
    for name, fn in (("create", cmd_create), ("list", cmd_list), ("revoke", cmd_revoke)):
        short, long = _HELP[name]
        p = ks.add_parser(name, help=short, description=long)
        p.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            help="gateway config: its state.redis_url and key_prefix (state.backend must be redis)",
        )
        p.add_argument(
            "--redis-url",
            help="overrides the config's state.redis_url (default without a config: "
            "redis://127.0.0.1:6379/0)",
        )
        p.add_argument("--key-prefix", help="overrides the config's state.key_prefix (default: llmgw:)")
        if name in ("create", "revoke"):
            p.add_argument("--id", required=True, help="the key's id, as it appears in the access log")
        if name == "create":
            p.add_argument(
                "--models", default="*", help="comma-separated globs, e.g. 'chat-*,demo-embed' (default: *)"
            )
            p.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
            p.add_argument("--tpm", type=int, help="tokens per minute (default: no limit)")
            p.add_argument(
                "--max-concurrency", type=int, help="requests in flight at once (default: no limit)"
            )
            p.add_argument(
                "--meta", action="append", default=[], help="KEY=VALUE, e.g. team=voice (repeatable)"
            )
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
            cfg = load_config(args.config)
        except ConfigError as exc:
            print(f"llmgw: invalid config {args.config}:\n{exc}", file=sys.stderr)
            raise SystemExit(2) from None
        problem = _cannot_hold_keys(cfg)
        if problem is not None:
            print(f"llmgw keys: {args.config}: {problem}", file=sys.stderr)
            raise SystemExit(2)
        state = cfg.state
    # the config's redis_mode (sentinel, cluster) applies; --redis-url replaces its URL
    target = redis_target(state, url=args.redis_url, timeout_s=3.0)
    return RedisKeyStore(RedisState(target, args.key_prefix or state.key_prefix))


def _cannot_hold_keys(cfg: GatewayConfig) -> str | None:
    """Why keys managed here would never reach a gateway running this config, or None."""
    if cfg.state.backend != "redis":
        return (
            f"state.backend is {cfg.state.backend!r}: keys live in the Redis state backend, and a gateway with "
            "this config reads none. Set state.backend: redis (and state.redis_url), or list keys in the config "
            "under auth.keys with hashes from `llmgw keys hash KEY`."
        )
    if not cfg.auth.redis_keys:
        return (
            "auth.redis_keys is false: gateways with this config accept only the keys listed in auth.keys. "
            "Set auth.redis_keys: true, or add the key's hash (`llmgw keys hash KEY`) to auth.keys."
        )
    return None


def _run(
    coro_fn: Callable[[RedisKeyStore, argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    store = _store(args)

    async def main() -> int:
        try:
            return await coro_fn(store, args)
        except ValueError as exc:
            print(f"llmgw: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # not reached, or it refused the command (a full Redis refuses writes)
            print(f"llmgw: Redis failed the command: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.backend.close()

    return asyncio.run(main())


def cmd_create(args: argparse.Namespace) -> int:
    async def go(store: RedisKeyStore, a: argparse.Namespace) -> int:
        try:
            visible_id(a.id, "the access log's api_key_id, metrics and Redis keys")
        except ValueError as exc:
            raise ValueError(f"--id {a.id!r}: {exc}") from None
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
        if a.config and a.id in {k.id for k in load_config(a.config).auth.keys}:
            # ids name a key in the access log, the metrics and the rate-limit state: two keys under one
            # id would share all three
            raise ValueError(f"{a.config} lists a key with id {a.id!r} under auth.keys; choose another id")
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
            print(
                f"{k.id:<20} {','.join(k.models):<30} {k.rpm or '-':>7} {k.tpm or '-':>9} "
                f"{k.max_concurrency or '-':>5}  {k.metadata or ''}"
            )
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
