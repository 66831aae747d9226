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
- other routes added to it: the activity page (:mod:`activity_events.http.page`),
  unless it has a port of its own (another :class:`HttpPort`).

Anything else than GET or HEAD on a probe is 405; a head that is not HTTP is 400.
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

from activity_events.http.web import BadRequest, Request, parse_head, send

logger = logging.getLogger(__name__)

Readiness = Callable[[], bool | Awaitable[bool]]
"""Says whether this replica should receive traffic; may be sync or async."""


class Routes(Protocol):
    """Some of a port's routes: answers a parsed request, or returns False to pass it on."""

    async def serve(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool: ...


REQUEST_TIMEOUT_SECONDS = 5.0
"""A client that has not sent its request head by then is dropped (slowloris guard)."""

MAX_HEAD_BYTES = 16 * 1024
"""Longest request head accepted; scrapers and probes send a few hundred bytes."""

BACKLOG = 1024
"""Connections the kernel queues before they are accepted (asyncio's default is 100):
a thousand browsers reconnecting at once after a restart are queued, not dropped
into SYN retransmissions of one, three, seven seconds."""


class HttpPort:
    """One listening port (port 0 picks one): each connection's request head is read
    (bounded in size and time), parsed once and offered to ``routes`` in turn; the
    first that claims it answers, none claiming is 404. One request a connection."""

    def __init__(self, name: str, host: str, port: int, routes: list[Routes]) -> None:
        self.name = name
        self.routes = routes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); only valid after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.name} is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving; raises OSError when the port is taken."""
        self._server = await asyncio.start_server(
            self._handle,
            self._host,
            self._port,
            reuse_address=True,
            limit=MAX_HEAD_BYTES,
            backlog=BACKLOG,
        )
        logger.info("%s served on http://%s:%d/", self.name, self._host, self.port)

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
            request = parse_head(head)
            for routes in self.routes:
                if await routes.serve(request, reader, writer):
                    return
            await send(writer, request, HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BadRequest):
            with contextlib.suppress(ConnectionError):
                await send(writer, None, HTTPStatus.BAD_REQUEST, "text/plain", b"bad request\n")
        except ConnectionError:
            pass
        except Exception:
            logger.exception("%s failed to answer", self.name)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


PROBE_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class Probes:
    """``/metrics``, ``/readyz`` and ``/healthz`` (200 while the loop runs)."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness | None) -> None:
        self._registry = registry
        self._readiness = readiness

    async def serve(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if request.path not in PROBE_PATHS:
            return False
        if request.method not in {"GET", "HEAD"}:
            await send(writer, request, HTTPStatus.METHOD_NOT_ALLOWED, "text/plain",
                       b"method not allowed\n", {"Allow": "GET, HEAD"})  # fmt: skip
        elif request.path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            await send(writer, request, HTTPStatus.OK, content_type, encoder(self._registry))
        elif request.path == "/readyz":
            ready = await self._is_ready()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            await send(
                writer, request, status, "text/plain", b"ready\n" if ready else b"not ready\n"
            )
        else:
            await send(writer, request, HTTPStatus.OK, "text/plain", b"ok\n")
        return True

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


class MetricsServer(HttpPort):
    """The HTTP side port: :class:`Probes`, then whatever routes are added (the
    activity page, unless it has a port of its own)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "0.0.0.0",  # noqa: S104 - scraped from other pods
        port: int = 9464,
        readiness: Readiness | None = None,
    ) -> None:
        super().__init__("Metrics and probes", host, port, [Probes(registry, readiness)])
