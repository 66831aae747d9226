"""The ``activity-server`` console script as a child process.

Lifecycle behaviour (signals, exit codes, start-up log lines, the embedded
Redis) can only be seen from outside the process, so these tests run the real
entry point. The environment is built from scratch: the parent's
``ACTIVITY_*``, ``PORT`` and ``OTEL_*`` variables never leak in.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .ports import free_port
from .processes import terminate

logger = logging.getLogger(__name__)

#: Prefixes of variables that configure the server (Consul KV included); stripped
#: from the inherited env.
SETTINGS_ENV_PREFIXES = ("ACTIVITY_", "OTEL_", "CONSUL_")
SETTINGS_ENV_NAMES = frozenset({"PORT"})

START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 15.0

STARTED_LINE = re.compile(r"Server has been started on (\d+)")


def clean_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's env) without any server settings."""
    source = os.environ if base is None else base
    return {
        name: value
        for name, value in source.items()
        if name not in SETTINGS_ENV_NAMES
        and not any(name.upper().startswith(prefix) for prefix in SETTINGS_ENV_PREFIXES)
    }


def server_command() -> list[str]:
    """How to run the server: the venv's console script, else ``python -m``."""
    script = Path(sys.executable).with_name("activity-server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "activity_events.app.server"]


def health_status(port: int, service: str = "", timeout: float = 1.0) -> int | None:
    """The health status the server reports for ``service``; ``None`` if it cannot be asked."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(response.status)


class ServerProcess:
    """One ``activity-server`` child process.

    ``env`` is added to a clean environment; ``ACTIVITY_PORT`` defaults to a
    free port chosen here and ``ACTIVITY_METRICS_PORT`` to 0, so several
    servers can run side by side. Output (stdout and stderr merged) is
    collected line by line in ``lines`` by a reader thread.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        cwd: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.env = clean_environ()
        self.env.update(
            {
                "ACTIVITY_PORT": str(self.port),
                "ACTIVITY_HOST": "127.0.0.1",
                "ACTIVITY_METRICS_PORT": "0",
                "ACTIVITY_METRICS_HOST": "127.0.0.1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        self.cwd = cwd
        self.command = command or server_command()
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """PID of the child while it runs; ``None`` before start and after exit."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def output(self) -> str:
        """Everything the child has printed so far."""
        with self._lock:
            return "\n".join(self.lines)

    def start(self, *, wait: bool = True, timeout: float = START_TIMEOUT_SECONDS) -> ServerProcess:
        """Spawn the child; with ``wait`` block until it logs its start and health is SERVING."""
        if self.pid is not None:
            raise RuntimeError(f"server already running (pid {self.pid})")
        self.lines = []
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        self._reader.start()
        if wait:
            self.wait_serving(timeout)
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.output)
            if found:
                return found
            if self.returncode is not None and self._reader is not None:
                self._reader.join(timeout=1)
                found = regex.search(self.output)
                if found:
                    return found
                raise RuntimeError(
                    f"server exited with {self.returncode} before printing {regex.pattern!r}:\n"
                    f"{self.output[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {regex.pattern!r} in server output after {timeout}s:\n"
                    f"{self.output[-4000:]}"
                )
            time.sleep(0.05)

    def wait_serving(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Block until the start-up line is logged and health says SERVING."""
        deadline = time.monotonic() + timeout
        self.wait_for_output(STARTED_LINE, timeout)
        self.wait_health(
            health_pb2.HealthCheckResponse.SERVING, max(0.5, deadline - time.monotonic())
        )

    def wait_health(self, status: int, timeout: float, service: str = "") -> None:
        """Block until health reports ``status`` for ``service``."""
        deadline = time.monotonic() + timeout
        last: int | None = None
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise RuntimeError(f"server exited with {self.returncode}:\n{self.output[-4000:]}")
            last = health_status(self.port, service, timeout=0.5)
            if last == status:
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"health of {service!r} was {last}, not {status}, after {timeout}s:\n"
            f"{self.output[-4000:]}"
        )

    def send_signal(self, signum: int) -> None:
        """Signal the child (by its PID); a no-op once it has exited."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for exit and return the exit code; TimeoutExpired if it does not exit."""
        assert self._process is not None
        code = self._process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout``. Idempotent."""
        process = self._process
        if process is None:
            return None
        try:
            terminate(process, timeout, "server")
        finally:
            if self._reader is not None:
                self._reader.join(timeout=2)
        return process.returncode

    def __repr__(self) -> str:
        return f"ServerProcess(port={self.port}, pid={self.pid})"
