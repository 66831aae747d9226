"""Private processes for a self-contained run: redis-server, the server, echo, naive.

``--spawn`` starts a redis-server on a free port in a temporary directory
(AOF with ``appendfsync everysec``, as the performance targets specify, no
RDB snapshots) and an ``activity-server`` pointed at it, its HTTP side port
(/metrics, the activity page) on a free port of its own; ``--echo`` starts the
in-memory echo server instead, ``--naive`` such a redis-server and the naive
server (`activity_events.bench.naive`). Every process is started here, its
output goes to a log file in the temporary directory (a full pipe would stall
it), and `Spawned.stop` ends each one by its PID: SIGTERM, then SIGKILL after
a grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from activity_events.app.embedded import RECOMMENDED_REDIS_CONFIG, redis_config_args
from activity_events.bench.stats import process_rss_mb

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 20.0
_POLL_S = 0.05
_STOP_GRACE_S = 15.0


ServerKind = Literal["spawn", "echo", "naive"]
"""What `spawn_stack` starts: the real server, the echo server or the naive server
(also the ``server`` field of results)."""


class SpawnError(RuntimeError):
    """A spawned process did not become ready; the message holds its log tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One started process, its role and its log file."""

    role: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always by this PID."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM; killing it", self.role, self.pid)
            self.process.kill()
            self.process.wait(timeout=5)


@dataclass
class Spawned:
    """What a self-contained run started: the target to benchmark and who serves it."""

    target: str
    workdir: Path
    redis_url: str | None = None
    metrics_url: str | None = None
    children: list[Child] = field(default_factory=list)
    startup_s: float | None = None
    startup_rss_mb: float | None = None

    def summary(self) -> str:
        """The line announcing what was started (PIDs, start-up time, where the logs are)."""
        started = ", ".join(f"{c.role} pid {c.pid}" for c in self.children)
        return f"spawned {started}; server ready in {self.startup_s}s (logs in {self.workdir})"

    def pids(self) -> dict[str, int]:
        """Role -> PID of the running children (for CPU and RSS accounting)."""
        return {child.role: child.pid for child in self.children}

    def stop(self) -> None:
        """Stops the children in reverse start order (server before its Redis)."""
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception:  # one failing stop must not leave the others running
                logger.exception("could not stop %s (pid %d)", child.role, child.pid)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start(role: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    log_path = workdir / f"{role}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
        )
    return Child(role, process, log_path)


async def _wait_redis(child: Child, url: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                break
            try:
                if await client.ping():
                    return
            except (OSError, aioredis.RedisError):
                await asyncio.sleep(_POLL_S)
    finally:
        await client.aclose()
    raise SpawnError(f"redis-server did not start:\n{child.log_tail()}")


async def _wait_listening(child: Child, host: str, port: int, deadline: float) -> None:
    """Polls the TCP port: a gRPC channel that met a refused connection would back off ~1 s."""
    while time.monotonic() < deadline and child.process.poll() is None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            await asyncio.sleep(_POLL_S)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def _wait_serving(child: Child, target: str, *, health: bool) -> None:
    """Waits for SERVING (health) or just a connection (echo, which has no health service)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    host, _, port = target.rpartition(":")
    await _wait_listening(child, host, int(port), deadline)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                break
            try:
                if not health:
                    await asyncio.wait_for(channel.channel_ready(), 0.5)
                    return
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except (TimeoutError, grpc.aio.AioRpcError):
                pass
            await asyncio.sleep(_POLL_S)
    raise SpawnError(f"{child.role} did not become ready on {target}:\n{child.log_tail()}")


async def spawn_redis(workdir: Path, config: dict[str, str] | None = None) -> tuple[Child, str]:
    """A private redis-server with AOF everysec and the recommended settings
    (``config`` overrides them) on a free port; returns it and its URL."""
    port = free_port()
    argv = [
        shutil.which("redis-server") or "redis-server",
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        *redis_config_args({**RECOMMENDED_REDIS_CONFIG, **(config or {})}),
    ]  # fmt: skip
    child = _start("redis", argv, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        await _wait_redis(child, url)
    except BaseException:
        child.stop()
        raise
    return child, url


async def spawn_stack(
    *,
    kind: ServerKind,
    server_env: dict[str, str] | None = None,
    redis_config: dict[str, str] | None = None,
) -> Spawned:
    """Starts Redis + server, the echo server, or Redis + the naive server, and
    waits until they serve.

    ``server_env`` applies to the real server only, ``redis_config`` to every
    Redis started. The caller must call `Spawned.stop` in ``finally``; on
    failure here, whatever was started is stopped before the error propagates.
    """
    workdir = Path(tempfile.mkdtemp(prefix="activity-bench-"))
    port = free_port()
    spawned = Spawned(target=f"127.0.0.1:{port}", workdir=workdir)
    try:
        env: dict[str, str] | None = None
        if kind == "echo":
            argv = [sys.executable, "-m", "activity_events.bench.echo", "--port", str(port)]
        else:
            redis_child, redis_url = await spawn_redis(workdir, redis_config)
            spawned.children.append(redis_child)
            spawned.redis_url = redis_url
            if kind == "naive":
                argv = [
                    sys.executable, "-m", "activity_events.bench.naive",
                    "--port", str(port), "--redis-url", redis_url,
                ]  # fmt: skip
            else:
                env = dict(os.environ)
                env.update(
                    {
                        "ACTIVITY_REDIS_URL": redis_url,
                        "ACTIVITY_PORT": str(port),
                        "PORT": str(port),
                        "ACTIVITY_HOST": "127.0.0.1",
                        # A known port (not 0) so that overload can scrape /metrics.
                        "ACTIVITY_METRICS_PORT": str(free_port()),
                        "ACTIVITY_METRICS_HOST": "127.0.0.1",
                    }
                )
                env.update(server_env or {})
                if env["ACTIVITY_METRICS_PORT"] != "0":  # --server-env may pick its own
                    spawned.metrics_url = f"http://127.0.0.1:{env['ACTIVITY_METRICS_PORT']}"
                argv = [
                    sys.executable, "-c", "from activity_events.app.server import main; main()",
                ]  # fmt: skip
        started = time.perf_counter()
        child = _start("server", argv, workdir, env)
        spawned.children.append(child)
        # The echo server has no health service: a connection is all it can show.
        await _wait_serving(child, spawned.target, health=kind != "echo")
        spawned.startup_s = round(time.perf_counter() - started, 3)
        spawned.startup_rss_mb = process_rss_mb(child.pid)
    except BaseException:
        spawned.stop()
        raise
    logger.info("%s", spawned.summary())
    return spawned
