"""A real Redis Cluster (3 primaries, no replicas) on loopback, for tests.

Built from RedisProcess nodes with ``--cluster-enabled yes`` and joined with
``redis-cli --cluster create``; every node is stopped by PID afterwards.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support.ports import port_is_open
from tests.support.redis_process import RedisProcess

CLUSTER_OPTIONS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "2000",
    "--save", "",
    "--appendonly", "no",
)  # fmt: skip

READY_TIMEOUT = 20.0


def redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli is needed for cluster tests (Debian package redis-tools)")
    return found


def cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free too; Redis
    refuses cluster ports above 55535."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if port == 6379 or port_is_open(port) or port_is_open(port + 10000):
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free cluster port pair found")


class RedisClusterProcesses:
    def __init__(self, directory: Path, primaries: int = 3) -> None:
        self.nodes = [
            RedisProcess(directory / f"node{i}", port=cluster_port(), options=CLUSTER_OPTIONS)
            for i in range(primaries)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                redis_cli(),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if all(
                b"cluster_state:ok" in self.client(node).execute_command("CLUSTER", "INFO")
                for node in self.nodes
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("redis cluster did not reach cluster_state:ok")

    def client(self, node: RedisProcess) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5)

    def node_id(self, node: RedisProcess) -> str:
        return str(self.client(node).execute_command("CLUSTER", "MYID").decode())

    def owner(self, slot: int) -> RedisProcess:
        for start, end, primary, *_ in self.client(self.nodes[0]).execute_command(
            "CLUSTER", "SLOTS"
        ):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(slot)

    def keys_per_node(self) -> dict[int, int]:
        return {node.port: int(self.client(node).dbsize()) for node in self.nodes}

    def move_slot(
        self, slot: int, target: RedisProcess, batch: int = 10, pause: float = 0.05
    ) -> int:
        """Migrate ``slot`` to ``target`` the way redis-cli --cluster reshard does,
        a few keys at a time (pausing between batches so writers race it).
        Returns the number of keys moved."""
        source = self.owner(slot)
        if source is target:
            return 0
        src, dst = self.client(source), self.client(target)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        while True:
            names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not names:
                break
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *names)
            moved += len(names)
            time.sleep(pause)
        for node in self.nodes:
            self.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
