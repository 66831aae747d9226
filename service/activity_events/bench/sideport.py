"""The server's HTTP side port as the overload scenario uses it: /metrics and page viewers.

Plain asyncio streams, no HTTP library: the side port answers one request per
connection and closes it (``Connection: close``), so a request is its head
and a response ends with the connection. That keeps a thousand viewers cheap
enough to run in the bench's own event loop: each costs one socket and a
64 KiB read now and then, and nothing is parsed past the status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from activity_events.observability.grpc_metrics import GO_CODE_NAMES

READ_CHUNK = 64 * 1024
"""Bytes a viewer asks for per read: big reads keep the per-event cost near nothing."""

RESET = b"event: reset"
"""The frame with which the server tells a browser to reload instead of catching up
(too far behind, or its cursor removed by retention); the stream ends after it."""

_PAGE_STREAMS = re.compile(r'^activity_streams_open\{kind="page_streams"\}\s+([0-9.e+]+)', re.M)

_HANDLED = re.compile(r"^grpc_server_handled_total\{([^}]*)\}\s+([0-9.e+]+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_STATUS_NAMES = {go: code.name for code, go in GO_CODE_NAMES.items()}
"""go-grpc-prometheus spells codes the Go way (``ResourceExhausted``, ``Canceled``);
results use grpc's names (``RESOURCE_EXHAUSTED``) like every other code field."""


class SidePortError(RuntimeError):
    """The side port did not answer as expected (wrong URL, page or metrics off)."""


@dataclass(frozen=True)
class SidePort:
    """host and port of the server's HTTP side port, from a URL like http://127.0.0.1:9464."""

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> SidePort:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise SidePortError(f"--metrics-url must be http://host:port, got {url!r}")
        return cls(parts.hostname, parts.port or 80)

    def request(self, path: str) -> bytes:
        """The request head of a GET of ``path``."""
        return f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode("latin-1")

    async def get(self, path: str, seconds: float) -> tuple[int, bytes]:
        """Status and body of one GET within ``seconds``; raises SidePortError when
        it cannot be had."""
        try:
            async with asyncio.timeout(seconds):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(self.request(path))
                    response = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise SidePortError(
                f"GET http://{self.host}:{self.port}{path}: {type(exc).__name__} {exc}"
            ) from exc
        head, _, body = response.partition(b"\r\n\r\n")
        return status_of(head.split(b"\r\n", 1)[0]), body

    async def page_streams(self, seconds: float) -> int:
        """``activity_streams_open{kind="page_streams"}`` now (0 when absent)."""
        status, body = await self.get("/metrics", seconds)
        if status != 200:
            raise SidePortError(f"/metrics answered {status}")
        match = _PAGE_STREAMS.search(body.decode("utf-8", errors="replace"))
        return int(float(match.group(1))) if match else 0

    async def handled(self, method: str, seconds: float) -> Counter[str]:
        """``grpc_server_handled_total`` of ``method`` now, by status code name."""
        status, body = await self.get("/metrics", seconds)
        if status != 200:
            raise SidePortError(f"/metrics answered {status}")
        return handled_counts(body.decode("utf-8", errors="replace"), method)


def status_of(status_line: bytes) -> int:
    """The status code of an HTTP status line (0 when it is not one)."""
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return 0
    return int(parts[1])


def handled_counts(text: str, method: str) -> Counter[str]:
    """Calls of ``method`` handled, by grpc status name, from Prometheus text."""
    counts: Counter[str] = Counter()
    for match in _HANDLED.finditer(text):
        labels = dict(_LABEL.findall(match.group(1)))
        if labels.get("grpc_method") == method:
            code = labels.get("grpc_code", "")
            counts[_STATUS_NAMES.get(code) or code] += int(float(match.group(2)))
    return counts


@dataclass
class Viewers:
    """Activity-page viewers: each GETs an SSE stream and reads and discards its bytes.

    ``refused`` counts answers other than 200 by status (and connections that
    failed by exception name); ``dropped`` counts streams the server ended
    while the viewers were meant to be watching, ``resets`` those of them it
    told to reload (a frame split across two reads is missed: it is rare
    enough, and scanning each chunk once keeps a viewer cheap).
    """

    side: SidePort
    path: str
    count: int
    opened: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    resets: int = 0
    bytes_read: int = 0
    _settled: int = 0
    _all_settled: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _watching: bool = True

    def start(self, connect_timeout: float) -> None:
        if self.count <= 0:
            self._all_settled.set()
        self._tasks = [asyncio.create_task(self._view(connect_timeout)) for _ in range(self.count)]

    def _settle(self) -> None:
        self._settled += 1
        if self._settled >= self.count:
            self._all_settled.set()

    async def _view(self, connect_timeout: float) -> None:
        writer = None
        try:
            try:
                async with asyncio.timeout(connect_timeout):
                    reader, writer = await asyncio.open_connection(self.side.host, self.side.port)
                    writer.write(self.side.request(self.path))
                    status = status_of(await reader.readline())
            except (OSError, TimeoutError) as exc:
                self.refused[type(exc).__name__] += 1
                self._settle()
                return
            if status != 200:
                self.refused[str(status)] += 1
                self._settle()
                return
            self.opened += 1
            self._settle()
            while chunk := await reader.read(READ_CHUNK):
                self.bytes_read += len(chunk)
                if RESET in chunk:
                    self.resets += 1
            if self._watching:
                self.dropped += 1
        except OSError:
            if self._watching:
                self.dropped += 1
        finally:
            if writer is not None:
                writer.close()

    async def wait_connected(self, seconds: float) -> None:
        """Until every viewer has its answer (or failed), or ``seconds`` passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_settled.wait(), seconds)

    async def close(self) -> None:
        """Ends every viewer (their connections close; the server sees them leave)."""
        self._watching = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class H2loadViewers:
    """The same viewers as one h2load process (HTTP/1.1, a connection and a GET
    each, bodies read and discarded in C): a thousand of them cost the machine a
    few percent of a core instead of a Python event loop's worth, so a viewer
    storm loads the server rather than the bench. What each viewer received is
    not known (``dropped``, ``resets`` and ``bytes_read`` stay None); how many
    are open is the server's own gauge, ``activity_streams_open{kind="page_streams"}``.
    """

    def __init__(self, executable: str, side: SidePort, path: str, count: int) -> None:
        self.executable = executable
        self.side = side
        self.path = path
        self.count = count
        self.opened = 0
        self.refused: Counter[str] = Counter()
        self.dropped: int | None = None
        self.resets: int | None = None
        self.bytes_read: int | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        if self.count <= 0:
            return
        argv = [
            self.executable, "--h1",
            "--requests", str(self.count),
            "--clients", str(self.count),
            "--max-concurrent-streams", "1",
            "--threads", "1",
            f"http://{self.side.host}:{self.side.port}{self.path}",
        ]  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def wait_connected(self, seconds: float) -> None:
        """Until the server counts every viewer's stream, or ``seconds`` passed;
        those not open by then are counted as refused."""
        deadline = time.monotonic() + seconds
        while self.count > 0:
            self.opened = await self.side.page_streams(max(0.5, deadline - time.monotonic()))
            if self.opened >= self.count or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        if self.opened < self.count:
            self.refused["not open"] = self.count - self.opened

    async def close(self) -> None:
        """Kills h2load (by its handle): every viewer's connection closes."""
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
