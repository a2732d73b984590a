"""Real Redis topologies for the e2e tests, from Debian's redis-server: a Cluster of 3 primaries (with
or without a replica each), and a primary with a replica watched by a sentinel. Free ports on
127.0.0.1, one temp dir each, killed at teardown. Readiness is waited on as events (cluster_state:ok,
every replica linked, the sentinel seeing the replica)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from harness import free_port

MASTER_SET = "gwprimary"


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            v = cond()
            if v:
                return v
        except Exception as exc:  # the server may still be starting
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


class RedisProc:
    """One redis-server (or sentinel) process on its own port and directory.

    A free port is only free when asked: another process (any outgoing connection takes an ephemeral
    port) may bind it before redis-server does. A start that fails that way is made again on new ports."""

    ATTEMPTS = 5

    def __init__(
        self, root: Path, name: str, *args: str, config: str | None = None, bus_port: bool = False
    ) -> None:
        for attempt in range(1, self.ATTEMPTS + 1):
            # a cluster's bus port gets a free port of its own (port + 10000 may be taken, or beyond 65535)
            bus = ["--cluster-port", str(free_port())] if bus_port else []
            if self._start(root, name, [*args, *bus], config):
                return
            log = (self.dir / "log").read_text()
            self.kill()
            if "Address already in use" not in log or attempt == self.ATTEMPTS:
                raise AssertionError(f"{name} on port {self.port} did not start; its log: {log[-2000:]}")

    def _start(self, root: Path, name: str, args: list[str], config: str | None) -> bool:
        """Start on a free port; True once it answers PING, False if it exited first."""
        self.port = free_port()
        self.dir = root / f"{name}-{self.port}"
        self.dir.mkdir(parents=True)
        cmd = ["redis-server"]
        if config is not None:  # a sentinel rewrites its config file, so it gets one of its own
            conf = self.dir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{config}")
            cmd += [str(conf), "--sentinel"]
        else:
            cmd += [
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                *args,
            ]
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

        def answered_or_exited() -> str | None:
            if self.proc.poll() is not None:
                return "exited"
            return "up" if self.client.ping() else None

        try:
            return wait_for(answered_or_exited, 10, f"{name} on port {self.port}") == "up"
        except AssertionError:
            return False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.client.close()
        self.log.close()


class Cluster:
    """Three primaries, slots split by `redis-cli --cluster create`; with ``replicas=1`` each primary has a
    replica of its own that the cluster promotes when the primary dies (after ``node_timeout_ms``)."""

    def __init__(self, root: Path, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.nodes: list[RedisProc] = []
        try:
            for i in range(3 * (1 + replicas)):
                self.nodes.append(
                    RedisProc(
                        root,
                        f"cluster{i}",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        bus_port=True,
                    )
                )
            out = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(n.address for n in self.nodes),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stdout + out.stderr
            for n in self.nodes:  # every node sees every slot served and every replica in its place
                wait_for(
                    lambda n=n: (
                        n.client.cluster("info")["cluster_state"] == "ok"
                        and sum("slave" in v["flags"].split(",") for v in n.client.cluster("nodes").values())
                        == 3 * replicas
                    ),
                    20,
                    f"cluster_state:ok and {3 * replicas} replicas known on {n.address}",
                )
            for n in self.nodes:  # a replica is promoted only with the data of its primary
                wait_for(
                    lambda n=n: n.client.info("replication").get("master_link_status", "up") == "up",
                    20,
                    f"the replication link of {n.address}",
                )
        except BaseException:
            self.stop()
            raise

    @property
    def seed_url(self) -> str:
        return f"redis://{self.nodes[0].address}/0"

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def node(self, address: str) -> RedisProc:
        return next(n for n in self.nodes if n.address == address)

    def live(self) -> list[RedisProc]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def view(self) -> dict[str, dict]:
        """CLUSTER NODES as a live node sees it: address -> flags, node_id, master_id, ..."""
        return self.live()[0].client.cluster("nodes")

    def owner(self, key: str) -> RedisProc:
        """The primary serving ``key``'s slot now."""
        client = self.live()[0].client
        slot = client.cluster("keyslot", key)
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                return self.node(f"{primary[0].decode()}:{primary[1]}")
        raise AssertionError(f"no primary serves slot {slot}")

    def replica_of(self, primary: RedisProc) -> RedisProc:
        view = self.view()
        primary_id = view[primary.address]["node_id"]
        return self.node(next(a for a, v in view.items() if v["master_id"] == primary_id))

    def primaries(self) -> set[str]:
        """Addresses of the primaries not marked failed, as a live node sees them."""
        flags = {a: set(v["flags"].split(",")) for a, v in self.view().items()}
        return {a for a, f in flags.items() if "master" in f and not f & {"fail", "fail?"}}

    def whole(self) -> bool:
        """Every live node says cluster_state:ok: each slot is served again."""
        return all(n.client.cluster("info")["cluster_state"] == "ok" for n in self.live())

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


class SentinelSet:
    """A primary, its replica and one sentinel (quorum 1) that promotes the replica when the primary dies."""

    def __init__(self, root: Path, down_after_ms: int = 1000) -> None:
        self.primary = RedisProc(root, "primary")
        self.replica: RedisProc | None = None
        self.sentinel: RedisProc | None = None
        try:
            self.replica = RedisProc(root, "replica", "--replicaof", "127.0.0.1", str(self.primary.port))
            wait_for(
                lambda: self.replica.client.info("replication")["master_link_status"] == "up",
                10,
                "the replica's link to the primary",
            )
            self.sentinel = RedisProc(
                root,
                "sentinel",
                config=(
                    f"sentinel monitor {MASTER_SET} 127.0.0.1 {self.primary.port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER_SET} {down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER_SET} 10000\n"
                ),
            )
            wait_for(
                lambda: any(
                    r["port"] == self.replica.port for r in self.sentinel.client.sentinel_slaves(MASTER_SET)
                ),
                30,
                "the sentinel to see the replica",
            )
        except BaseException:
            self.stop()
            raise

    def master_port(self) -> int:
        return int(self.sentinel.client.sentinel_get_master_addr_by_name(MASTER_SET)[1])

    def stop(self) -> None:
        for p in (self.sentinel, self.replica, self.primary):
            if p is not None:
                p.kill()
