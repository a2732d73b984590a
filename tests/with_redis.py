"""Run a command with Redis answering on 127.0.0.1:6379: the one there, or a redis-server started for it.

`python tests/with_redis.py pytest -q tests` (what `make test` does). A Redis started here lives only as
long as the command, keeps nothing on disk, and is announced, so nobody wonders where it came from.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
PORT = int(os.environ.get("WITH_REDIS_PORT", "6379"))  # another port only for this script's own test


def redis_answers() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: with_redis.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    if redis_answers():
        return subprocess.call(argv)
    server = shutil.which("redis-server")
    if server is None:
        print(
            f"with_redis: no Redis answers on {HOST}:{PORT} and redis-server is not installed "
            "(Debian/Ubuntu: apt-get install redis-server)",
            file=sys.stderr,
        )
        return 1
    print(f"with_redis: no Redis answered on {HOST}:{PORT}: starting {server} there for this run", flush=True)
    proc = subprocess.Popen(
        [server, "--bind", HOST, "--port", str(PORT), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"with_redis: redis-server did not start (exit {proc.poll()})", file=sys.stderr)
                return 1
            time.sleep(0.05)
        return subprocess.call(argv)
    finally:
        proc.terminate()
        proc.wait(10)
        print(f"with_redis: stopped the redis-server started for this run on {HOST}:{PORT}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
