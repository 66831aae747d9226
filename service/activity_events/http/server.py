"""The HTTP side port: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for Kubernetes.

Three tiny GET endpoints do not justify a web framework, and
prometheus_client's own server runs in a thread with its own registry
handling; this one runs on the service's event loop with asyncio streams,
serves the registry it is given, and answers each request on its own
connection (``Connection: close``), which is what scrapers and kubelet
probes expect.

- ``/metrics``: the registry in the Prometheus text format (OpenMetrics when
  the scraper asks for it in ``Accept``).
- ``/healthz``: 200 while the process and its event loop run (liveness).
- ``/readyz``: 200 when the ``readiness`` callable says so (Redis reachable
  and not shutting down, decided by the caller), else 503 (readiness).
- with ``page`` set: the activity page's routes (:mod:`activity_events.http.page`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

logger = logging.getLogger(__name__)

Readiness = Callable[[], bool | Awaitable[bool]]
"""Says whether this replica should receive traffic; may be sync or async."""


class PageHandler(Protocol):
    """Other routes on this port (the activity page): answers a request head, or returns False."""

    async def serve(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool: ...


REQUEST_TIMEOUT_SECONDS = 5.0
"""A client that has not sent its request head by then is dropped (slowloris guard)."""

MAX_HEAD_BYTES = 16 * 1024
"""Longest request head accepted; scrapers and probes send a few hundred bytes."""


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0 picks one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "0.0.0.0",  # noqa: S104 - scraped from other pods
        port: int = 9464,
        readiness: Readiness | None = None,
    ) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._readiness = readiness
        self.page: PageHandler | None = None
        """Set to serve the activity page's routes on this port too."""
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); only valid after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving; raises OSError when the port is taken."""
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, reuse_address=True, limit=MAX_HEAD_BYTES
        )
        logger.info("Metrics and probes are served on http://%s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop accepting and close open connections."""
        if self._server is None:
            return
        self._server.close()
        close_clients = getattr(self._server, "close_clients", None)  # Python 3.13+
        if close_clients is not None:
            close_clients()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_SECONDS)
            if self.page is not None and await self.page.serve(head, reader, writer):
                return
            status, content_type, body, is_head = await self._respond(head)
            self._write(writer, status, content_type, b"" if is_head else body, len(body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self._write(writer, HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            logger.exception("HTTP side port failed to answer")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[HTTPStatus, str, bytes, bool]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n", False
        verb, target, _version = parts
        if verb not in {"GET", "HEAD"}:
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"method not allowed\n", False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        is_head = verb == "HEAD"
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return HTTPStatus.OK, content_type, encoder(self._registry), is_head
        if path == "/healthz":
            return HTTPStatus.OK, "text/plain", b"ok\n", is_head
        if path == "/readyz":
            ready = await self._is_ready()
            if ready:
                return HTTPStatus.OK, "text/plain", b"ready\n", is_head
            return HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"not ready\n", is_head
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n", is_head

    async def _is_ready(self) -> bool:
        if self._readiness is None:
            return True
        try:
            answer = self._readiness()
            if inspect.isawaitable(answer):
                answer = await asyncio.wait_for(answer, REQUEST_TIMEOUT_SECONDS)
            return bool(answer)
        except Exception:
            logger.warning("Readiness check failed", exc_info=True)
            return False

    @staticmethod
    def _write(
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        content_type: str,
        body: bytes,
        length: int | None = None,
    ) -> None:
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
