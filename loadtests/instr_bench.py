#!/usr/bin/env python3
"""Instructions per request under callgrind: the gateway's CPU cost as a count, not a time.

CPU seconds per request move by 10-40 % between runs on a shared 2-core VM; the number of instructions
a process executes for the same requests barely moves (0.5 % in one process, about 1.5 % between runs). Each proxy
(the floor, our gateway, and with ``--baseline-src`` a second checkout of the gateway) runs under
``valgrind --tool=callgrind`` with instrumentation off; after a warm-up, instrumentation is switched on
for exactly ``--requests`` requests at concurrency 1 (``--concurrency``) and the total is read from
callgrind's dump.
Everything the process executes counts (the event loop, the access-log thread, the upstream client);
the kernel's work does not.

    .venv/bin/python loadtests/instr_bench.py                         # floor and llmgw, json and stream
    git worktree add /tmp/base HEAD~1
    .venv/bin/python loadtests/instr_bench.py --baseline-src /tmp/base  # a change against its parent

Needs valgrind (Debian: apt-get install valgrind) and the shared bench tools (``../shared/bench``).
Takes the benchmark lock. Exit codes: 0 done, 2 set-up problem.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench import REPO, gateway_config
from bench_procs import Service, free_port
from fleet import machine, take_lock

TOTALS = re.compile(rb"^totals:\s*(\d+)", re.M)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", type=Path, default=REPO.parent / "shared" / "bench")
    ap.add_argument(
        "--bench-python",
        default=os.environ.get("BENCH_PY") or sys.executable,
        help="python with uvloop, httptools, aiohttp for the mock, the load generator and the floor",
    )
    ap.add_argument("--gateway-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also measure the gateway from this source tree as llmgw-baseline",
    )
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per target and mode")
    ap.add_argument("--warmup", type=int, default=300, help="requests before counting starts")
    ap.add_argument("--modes", default="json,stream")
    ap.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="clients at once: above 1, work batched per loop turn counts too (timing-dependent)",
    )
    ap.add_argument("--no-lock", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (JSON beside it)")
    return ap.parse_args(argv)


def loadgen(a: argparse.Namespace, url: str, mode: str, n: int) -> None:
    argv = [
        a.bench_python,
        str(a.bench_dir / "loadgen.py"),
        "--url",
        url,
        "--model",
        "fast",
        "-c",
        str(a.concurrency),
        "-n",
        str(n),
        "--max-tokens",
        "64",
        "--json",
    ]
    if mode == "stream":
        argv += ["--stream", "--include-usage"]
    out = subprocess.run(argv, capture_output=True, timeout=600)
    res = json.loads(out.stdout.decode().strip().splitlines()[-1])
    if out.returncode != 0 or res.get("ok") != n:
        raise RuntimeError(
            f"loadgen {mode} against {url}: {res.get('ok')} of {n} ok, errors {res.get('errors')}"
        )


def callgrind(pid: int, *commands: str) -> None:
    for c in commands:
        subprocess.run(
            ["callgrind_control", *c.split(), str(pid)], capture_output=True, check=True, timeout=120
        )


def count(a: argparse.Namespace, svc: Service, url: str, mode: str, dump_dir: Path) -> float:
    """Instructions per request of ``svc`` for ``a.requests`` requests of ``mode``."""
    loadgen(a, url, mode, a.warmup)
    before = set(dump_dir.glob(f"{svc.name}.cg.*"))
    callgrind(svc.pid, "-z", "-i on")
    loadgen(a, url, mode, a.requests)
    callgrind(svc.pid, "-i off", "-d")
    for _ in range(50):  # the dump is written by the target process
        new = [p for p in set(dump_dir.glob(f"{svc.name}.cg.*")) - before if p.stat().st_size > 0]
        if new:
            m = TOTALS.search(max(new, key=lambda p: p.stat().st_mtime).read_bytes())
            if m:
                return int(m.group(1)) / a.requests
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump from {svc.name}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instr_bench: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    if not (a.bench_dir / "loadgen.py").exists():
        print(f"instr_bench: shared bench tools not found in {a.bench_dir}", file=sys.stderr)
        return 2
    if not a.no_lock:
        take_lock()
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-instr-"))
    services: list[Service] = []
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    results: dict[str, dict[str, float]] = {}
    start_line = machine()
    try:
        mport = free_port()
        mock = Service(
            "mock",
            [
                a.bench_python,
                str(a.bench_dir / "mock_upstream.py"),
                "--port",
                str(mport),
                "--ttft-ms",
                "0",
                "--itl-ms",
                "0",
                "--tokens",
                "20",
            ],
            tmp,
        )
        services.append(mock)
        mock.wait_ready(f"http://127.0.0.1:{mport}/health", 30)
        mock_base = f"http://127.0.0.1:{mport}/v1"
        vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        targets: list[tuple[str, list[str], dict[str, str], str]] = []
        port = free_port()
        targets.append(
            (
                "floor",
                [
                    a.bench_python,
                    str(a.bench_dir / "floor_proxy.py"),
                    "--port",
                    str(port),
                    "--upstream",
                    mock_base,
                    "--log",
                    str(tmp / "floor.jsonl"),
                ],
                {},
                f"http://127.0.0.1:{port}",
            )
        )
        gateways = [("llmgw", None)] + ([("llmgw-baseline", a.baseline_src)] if a.baseline_src else [])
        for name, src in gateways:
            port = free_port()
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(
                yaml.safe_dump(gateway_config(mock_base, port, tmp / f"{name}.jsonl"), sort_keys=False)
            )
            env = {"PYTHONPATH": str(src.resolve())} if src is not None else {}
            targets.append(
                (
                    name,
                    [
                        a.gateway_python,
                        "-m",
                        "gateway",
                        "serve",
                        "--config",
                        str(cfg),
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    env,
                    f"http://127.0.0.1:{port}",
                )
            )
        for name, cmd, env, root in targets:
            svc = Service(
                name,
                [*vg, f"--callgrind-out-file={tmp}/{name}.cg.%p", *cmd],
                tmp,
                env=dict(os.environ, **env),
                cwd=tmp,
            )
            services.append(svc)
            svc.wait_ready(root + ("/health" if name == "floor" else "/readyz"), 300)
            results[name] = {m: count(a, svc, root + "/v1", m, tmp) for m in modes}
            print(
                f"{name}: "
                + ", ".join(f"{m} {v:,.0f} instructions/request" for m, v in results[name].items()),
                file=sys.stderr,
            )
            svc.stop()
    except RuntimeError as exc:
        print(f"instr_bench: {exc}", file=sys.stderr)
        return 2
    finally:
        for s in services:
            s.stop()
    rows = [
        "| target | " + " | ".join(f"{m}: instructions/request | {m}: ÷ floor" for m in modes) + " |",
        "|---|" + "---|---|" * len(modes),
    ]
    for name, per in results.items():
        rows.append(
            f"| {name} | "
            + " | ".join(f"{per[m]:,.0f} | {per[m] / results['floor'][m]:.2f}x" for m in modes)
            + " |"
        )
    md = (
        f"# Instructions per request ({time.strftime('%Y-%m-%d %H:%M')})\n\n- machine: {start_line}\n"
        f"- method: callgrind, instrumentation on for {a.requests} requests per mode at c={a.concurrency} after {a.warmup} "
        "warm-up; mock instant, 20 tokens; gateway with every feature on (bench.py's config)\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(md)
    out = a.out or REPO / "loadtests" / "results" / f"instructions-{time.strftime('%Y-%m-%d')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
