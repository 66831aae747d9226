"""A Sentinel-managed primary/replica pair on loopback, for failover tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.support.ports import free_port
from tests.support.redis_process import RedisProcess, ping, redis_server_binary

MASTER = "mymaster"
READY_TIMEOUT = 20.0


REJOIN_NUDGE_S = 5.0
"""How long the old primary is given to sync before it is told REPLICAOF again."""


class SentinelSet:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisProcess(
            directory / "primary", options=("--save", "", "--appendonly", "yes")
        )
        self.replica = RedisProcess(
            directory / "replica",
            options=(
                "--save",
                "",
                "--appendonly",
                "yes",
                "--replicaof",
                "127.0.0.1",
                str(self.primary.port),
            ),
        )
        self.sentinel_port = free_port()
        self._sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{MASTER}"

    def start(self) -> SentinelSet:
        self.primary.start()
        self.replica.start()
        self._wait(lambda: self._following(self.replica, self.primary), "replica in sync")
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 4000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self._sentinel = subprocess.Popen(
            [
                redis_server_binary(),
                str(config),
                "--sentinel",
                "--logfile",
                str(self.directory / "sentinel.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait(lambda: ping(self.sentinel_port), "sentinel up")
        self._wait(lambda: self.master_port() == self.primary.port, "sentinel knows the primary")
        return self

    @staticmethod
    def _following(replica: RedisProcess, primary: RedisProcess) -> bool:
        """``replica`` replicates ``primary`` and its link is up (in sync)."""
        info = redis.Redis(port=replica.port, socket_timeout=2).info("replication")
        return (
            info.get("role") == "slave"
            and info.get("master_port") == primary.port
            and info.get("master_link_status") == "up"
        )

    def master_port(self) -> int | None:
        try:
            client = redis.Redis(port=self.sentinel_port, socket_timeout=2)
            address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def _wait(self, check: object, what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached within {timeout}s")

    def wait_failover(self, timeout: float = 30.0) -> None:
        self._wait(
            lambda: self.master_port() == self.replica.port, "failover to the replica", timeout
        )

    def rejoin_old_primary(self, timeout: float = 60.0) -> None:
        """Restart the killed old primary as a replica of the master Sentinel now
        names, as Sentinel-aware start scripts do, and wait until it is in sync.
        (Left to itself, Sentinel converts a returning old master only after it
        has reported itself as master for 8 s, at its next 10 s INFO, and never
        while in TILT mode; on a loaded machine 60 s were seen to pass without
        it, failing CI.)"""
        master = self.master_port()
        assert master == self.replica.port, f"Sentinel names {master} as master"
        self.primary.options = (
            *self.primary.options,
            "--replicaof",
            "127.0.0.1",
            str(master),
        )
        self.primary.start()
        deadline = time.monotonic() + timeout
        while True:
            # Asked again every few seconds: Sentinel may have told it otherwise
            # meanwhile, and REPLICAOF of the master it already follows is a no-op.
            with contextlib.suppress(redis.RedisError):
                redis.Redis(port=self.primary.port, socket_timeout=2).execute_command(  # type: ignore[no-untyped-call]
                    "REPLICAOF", "127.0.0.1", str(self.replica.port)
                )
            try:
                self._wait(
                    lambda: self._following(self.primary, self.replica),
                    "old primary rejoined as a replica",
                    min(REJOIN_NUDGE_S, max(0.1, deadline - time.monotonic())),
                )
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"old primary rejoined as a replica not reached within {timeout}s; "
                        f"its replication: {self._replication(self.primary)}; "
                        f"its log ends: {self._log_tail(self.primary)}; "
                        f"the new master's log ends: {self._log_tail(self.replica)}"
                    ) from None

    @staticmethod
    def _replication(server: RedisProcess) -> object:
        try:
            return redis.Redis(port=server.port, socket_timeout=2).info("replication")
        except redis.RedisError as error:
            return repr(error)

    @staticmethod
    def _log_tail(server: RedisProcess, lines: int = 15) -> str:
        try:
            return " | ".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return repr(error)

    def stop(self) -> None:
        if self._sentinel is not None and self._sentinel.poll() is None:
            self._sentinel.send_signal(signal.SIGTERM)
            try:
                self._sentinel.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._sentinel.kill()
                self._sentinel.wait(timeout=5)
        self.replica.stop()
        self.primary.stop()
