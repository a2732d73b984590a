"""Sub-commands that drive gateway parts outside a server: warmup (and keys, see security)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.config import ConfigError, load_config


def add_more_commands(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("warmup", help="warm every configured and learned schema on every deployment, then exit")
    w.add_argument("--config", "-c", required=True)
    w.add_argument("--no-learned", action="store_true", help="skip schemas learned from traffic (state backend)")
    w.set_defaults(func=cmd_warmup)
    try:
        from gateway.security.cli import add_key_commands
    except ImportError:  # security module not installed in this build
        return
    add_key_commands(sub)


def cmd_warmup(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"llmgw: invalid config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    return asyncio.run(_warmup(cfg, not args.no_learned))


async def _warmup(cfg, learned: bool) -> int:  # noqa: ANN001
    """One pass of the server's own warm-up (gateway/upstream/warmup.py) over every model, then a report."""
    from gateway.state.redis import make_state
    from gateway.upstream import warmup
    from gateway.upstream.client import UpstreamClient
    from gateway.upstream.schemas import SchemaLearner

    backend = make_state(cfg.state.backend, cfg.state.redis_url, cfg.state.key_prefix)
    learner = SchemaLearner(backend, ttl_s=cfg.state.key_ttl_s, max_per_model=10_000) if learned else None
    clients: list[UpstreamClient] = []
    failed_required = False
    total = 0
    print(f"{'MODEL':<20} {'DEPLOYMENT':<24} {'SCHEMA':<28} {'RESULT':<8} {'MS':>9}  DETAIL")
    try:
        for m in cfg.models:
            deployments = []
            for d in m.deployments:
                c = UpstreamClient(d)
                clients.append(c)
                deployments.append((c, d.model or m.name))
            for mw in await warmup.plan([(m.name, m.warmup, deployments)], learner):
                for c, _ in deployments:
                    await c.start()
                for r in await warmup.warm_pass(mw):
                    total += 1
                    print(f"{r.model:<20} {r.deployment:<24} {r.schema[:28]:<28} {'ok' if r.ok else 'FAILED':<8} "
                          f"{r.ms:>9.1f}  {r.detail}")
                    if not r.ok and m.warmup.required:
                        failed_required = True
    finally:
        for c in clients:
            await c.close()
        try:
            await backend.close()
        except Exception:
            pass
    print(f"\n{total} warm-up request(s); {'a REQUIRED warm-up failed' if failed_required else 'all required ok'}")
    return 1 if failed_required else 0
